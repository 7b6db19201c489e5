"""Preference tuning with TRL's DPOTrainer and PEFT LoRA/QLoRA; same output contract as SFT.

The reference model is the base with the adapter switched off, so no second copy is loaded.
Pairs are conversational: ``{"prompt": [messages], "chosen": [assistant message], "rejected": [...]}``,
rendered by the base model's own chat template; the chosen and rejected answers end on its EOS.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from core.errors import InvalidRequest
from training.config import TrainConfig
from training.sft import (
    TrainResult,
    chat_messages,
    check_data,
    fit,
    load_base,
    make_trainer,
    render_chat,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, TrainerCallback
    from trl.trainer.dpo_trainer import DPOTrainer


def train_dpo(
    config: TrainConfig,
    train_pairs: Sequence[Mapping[str, Any]],
    val_pairs: Sequence[Mapping[str, Any]] = (),
    *,
    data_files: Mapping[str, Any] | None = None,
    resume: bool | Path = False,
    console: Console | None = None,
    callbacks: Sequence[TrainerCallback] = (),
) -> TrainResult:
    """Train a LoRA/QLoRA adapter on preference pairs and write it with its manifest (see ``train_sft``)."""
    return fit(
        config,
        "dpo",
        dpo_trainer,
        train_pairs,
        val_pairs,
        data_files=data_files,
        resume=resume,
        console=console,
        callbacks=callbacks,
    )


def dpo_trainer(
    config: TrainConfig,
    train_pairs: Sequence[Mapping[str, Any]],
    val_pairs: Sequence[Mapping[str, Any]] = (),
    *,
    console: Console | None = None,
) -> DPOTrainer:
    """The configured DPOTrainer, pairs tokenized, not yet trained."""
    import torch
    from trl.trainer.dpo_config import DPOConfig
    from trl.trainer.dpo_trainer import DPOTrainer

    check_data(config, train_pairs, val_pairs)
    train_rows = [_pair_row(pair, i, "train") for i, pair in enumerate(train_pairs)]
    val_rows = [_pair_row(pair, i, "val") for i, pair in enumerate(val_pairs)]
    model, tokenizer, dtype = load_base(config)
    check_pairs(tokenizer, train_rows, "train", config.max_length)
    check_pairs(tokenizer, val_rows, "val", config.max_length)
    args = DPOConfig(
        **config.trainer_arguments(has_val=bool(val_rows), packing=False, bf16=dtype == torch.bfloat16),
        beta=config.beta,
    )
    trainer = make_trainer(
        DPOTrainer,
        config,
        model=model,
        tokenizer=tokenizer,
        args=args,
        train_rows=train_rows,
        val_rows=val_rows,
        console=console,
        title="DPO",
    )
    return trainer  # type: ignore[return-value]


def check_pairs(
    tokenizer: PreTrainedTokenizerBase, rows: Sequence[Mapping[str, Any]], split: str, max_length: int | None = None
) -> None:
    """The prompt, rendered as served (with the generation prompt), is the start of prompt + answer, each
    answer's rendering holds the EOS, which DPO then trains as part of the completion, and truncation to
    ``max_length`` would not cut that EOS off."""
    eos = tokenizer.eos_token
    for index, row in enumerate(rows):
        prompt = render_chat(tokenizer, row["prompt"], generation_prompt=True)
        for key in ("chosen", "rejected"):
            text = render_chat(tokenizer, row["prompt"] + row[key])
            if not text.startswith(prompt):
                raise InvalidRequest(
                    f"{split} pair {index}: the chat template renders the prompt differently once the "
                    f"'{key}' answer follows it, so DPO would compare answers to a prompt never served"
                )
            if eos not in text[len(prompt) :]:
                raise InvalidRequest(
                    f"{split} pair {index}: the '{key}' answer does not end on the EOS token {eos!r}, "
                    "so the adapter would not learn to stop"
                )
            length = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            if max_length is not None and length > max_length:
                raise InvalidRequest(
                    f"{split} pair {index}: prompt and '{key}' answer are {length} tokens long, above max_length "
                    f"{max_length}: truncation would cut the answer and its EOS; raise max_length or shorten it"
                )


def _pair_row(pair: Mapping[str, Any], index: int, split: str) -> dict[str, Any]:
    """A pair as plain message lists; the answers come from the assistant, the prompt does not end with one."""
    where = f"{split} pair {index}"
    row = {key: chat_messages(pair.get(key), f"{where} '{key}'") for key in ("prompt", "chosen", "rejected")}
    for key in ("chosen", "rejected"):
        if any(m["role"] != "assistant" for m in row[key]):
            raise InvalidRequest(f"{where}: '{key}' must hold assistant messages only")
    if row["prompt"][-1]["role"] == "assistant":
        raise InvalidRequest(f"{where}: the prompt must end with a user (or system) message, not the assistant")
    return row
