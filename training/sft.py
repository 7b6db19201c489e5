"""Supervised fine-tuning with TRL's SFTTrainer and PEFT LoRA/QLoRA, and the run loop DPO shares.

Loss falls on assistant tokens only (``assistant_only_loss``), rendered by the base model's own chat
template. TRL needs ``{% generation %}`` markers to find those tokens; a template without them gets a
marked copy (TRL's, or one of ``TRAINING_TEMPLATES``) that must render every training example to the
very same text as the original, or training is refused.

EOS: the assistant turn's end-of-turn token (``<|im_end|>``, SmolLM2's EOS) lies inside the marked span,
so it is a label. SmolLM2 pads with that same token; TRL builds labels from the assistant mask before
batching and pads labels with -100 by position, never by token id, so the EOS keeps its label while
the padding after it does not. ``check_chat_examples`` refuses data where an assistant turn would not end
on a trained EOS.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from core.errors import InvalidRequest
from training.config import TrainConfig
from training.manifest import Manifest, build_manifest, data_summary, write_manifest
from training.progress import RichProgress, loss_table

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback
    from trl.trainer.sft_trainer import SFTTrainer

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")

SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# The same text; the assistant's content and its <|im_end|> (the EOS it must learn to emit) are marked.
SMOLLM2_TRAINING_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Base chat template -> the same template with {% generation %} markers, for templates TRL does not know.
TRAINING_TEMPLATES = {SMOLLM2_CHAT_TEMPLATE: SMOLLM2_TRAINING_TEMPLATE}


@dataclass(frozen=True)
class TrainResult:
    """A finished run: the adapter directory (PEFT files + manifest) and what happened on the way."""

    adapter_dir: Path
    manifest: Manifest
    global_step: int
    stopped_early: bool
    best_checkpoint: Path | None
    resumed_from: Path | None


def train_sft(
    config: TrainConfig,
    train: Sequence[Mapping[str, Any]],
    val: Sequence[Mapping[str, Any]] = (),
    *,
    data_files: Mapping[str, Any] | None = None,
    resume: bool | Path = False,
    console: Console | None = None,
    callbacks: Sequence[TrainerCallback] = (),
) -> TrainResult:
    """Train a LoRA/QLoRA adapter on chat examples (``{"messages": [...]}``) and write it with its manifest.

    ``data_files`` is the loader's per-file record (hashes, counts), stored in the manifest as given.
    ``resume=True`` continues from the latest checkpoint under ``config.checkpoint_dir``; a path, from that one.
    ``callbacks`` join the trainer's own (the fine-tuning worker reports progress and stops through them).
    """
    return fit(
        config,
        "sft",
        sft_trainer,
        train,
        val,
        data_files=data_files,
        resume=resume,
        console=console,
        callbacks=callbacks,
    )


def fit(
    config: TrainConfig,
    method: str,
    build: Callable[..., Trainer],
    train: Sequence[Mapping[str, Any]],
    val: Sequence[Mapping[str, Any]],
    *,
    data_files: Mapping[str, Any] | None,
    resume: bool | Path,
    console: Console | None,
    callbacks: Sequence[TrainerCallback] = (),
) -> TrainResult:
    """What SFT and DPO runs share: check the method, prepare the output, build the trainer, run it."""
    if config.method != method:
        raise InvalidRequest(f"train_{method} needs method '{method}', got {config.method!r}", param="method")
    console = console or Console(stderr=True)
    checkpoint = prepare_output(config, resume)
    trainer = build(config, train, val, console=console)
    for callback in callbacks:
        trainer.add_callback(callback)
    return run_training(
        trainer,
        config,
        data=data_summary(train, val, data_files),
        checkpoint=checkpoint,
        console=console,
    )


def sft_trainer(
    config: TrainConfig,
    train: Sequence[Mapping[str, Any]],
    val: Sequence[Mapping[str, Any]] = (),
    *,
    console: Console | None = None,
) -> SFTTrainer:
    """The configured SFTTrainer, data tokenized and masked, not yet trained."""
    import torch
    from trl.trainer.sft_config import SFTConfig
    from trl.trainer.sft_trainer import SFTTrainer

    check_data(config, train, val)
    model, tokenizer, dtype = load_base(config)
    template = training_chat_template(tokenizer)
    train_rows = [{"messages": chat_messages(e.get("messages"), f"train example {i}")} for i, e in enumerate(train)]
    val_rows = [{"messages": chat_messages(e.get("messages"), f"val example {i}")} for i, e in enumerate(val)]
    check_chat_examples(tokenizer, template, train_rows, "train", config.max_length)
    check_chat_examples(tokenizer, template, val_rows, "val", config.max_length)
    # Only this in-memory tokenizer gains the markers; the adapter is served with the base model's
    # template, which check_chat_examples has just shown renders every example the same.
    tokenizer.chat_template = template
    args = SFTConfig(
        **config.trainer_arguments(has_val=bool(val_rows), packing=config.packing, bf16=dtype == torch.bfloat16),
        assistant_only_loss=True,
        packing=config.packing,
        packing_strategy="bfd",
    )
    trainer = make_trainer(
        SFTTrainer,
        config,
        model=model,
        tokenizer=tokenizer,
        args=args,
        train_rows=train_rows,
        val_rows=val_rows,
        console=console,
        title="SFT",
    )
    return trainer  # type: ignore[return-value]


# -- pieces shared with DPO ---------------------------------------------------------------------


def load_base(config: TrainConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, torch.dtype]:
    """The base model (4-bit NF4 for QLoRA), its tokenizer, and the compute dtype."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (config.base_model / "config.json").is_file():
        raise InvalidRequest(f"base model {config.base_model} has no config.json", param="base_model")
    cuda = torch.cuda.is_available()
    dtype = config.resolved_dtype("cuda" if cuda else "cpu")
    kwargs: dict[str, Any] = {"dtype": dtype}
    quantization = config.quantization_config(dtype)
    if quantization is not None:
        _require_bitsandbytes()
        kwargs["quantization_config"] = quantization
    if cuda or quantization is not None:
        # Straight onto this process's device: bitsandbytes quantizes while loading there, and a large base
        # never needs a full-precision copy in host memory. Under torchrun/accelerate each rank has its own GPU.
        kwargs["device_map"] = {"": f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(str(config.base_model), **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(config.base_model))
    if tokenizer.eos_token_id is None:
        raise InvalidRequest(f"the tokenizer of {config.base_model} has no EOS token; adapters could not learn to stop")
    return model, tokenizer, dtype


def make_trainer(
    trainer_class: type[Trainer],
    config: TrainConfig,
    *,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    args: Any,
    train_rows: Sequence[Mapping[str, Any]],
    val_rows: Sequence[Mapping[str, Any]],
    console: Console | None,
    title: str,
) -> Trainer:
    """A TRL trainer built the same way for every method.

    LoRA from the config; the rich bar instead of transformers' log printer; early stopping on
    validation loss when asked for; no usage report to the Hugging Face Hub. TRL casts a quantized
    model's trainable weights to bf16 (the QLoRA paper's choice); here LoRA weights always stay in
    full precision, as master weights, while the bf16 or 4-bit base computes in the compute dtype.
    """
    import torch
    from datasets import Dataset
    from transformers import EarlyStoppingCallback, PrinterCallback

    callbacks: list[Any] = [RichProgress(console or Console(stderr=True), f"{title} {config.model_name}")]
    if config.early_stopping_patience is not None and val_rows:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience))
    quiet = type(trainer_class.__name__, (trainer_class,), {"_send_telemetry": _no_telemetry})
    with _quiet_datasets():
        trainer: Trainer = quiet(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(list(train_rows)),
            eval_dataset=Dataset.from_list(list(val_rows)) if val_rows else None,
            processing_class=tokenizer,
            peft_config=config.lora_config(),
            callbacks=callbacks,
        )
    trainer.remove_callback(PrinterCallback)
    # PEFT already keeps LoRA weights fp32 over a bf16 base; TRL casts them to bf16 over a 4-bit one.
    for parameter in peft_model(trainer).parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.to(torch.float32)
    return trainer


def _no_telemetry(self: Trainer) -> None:
    """Quiver does not report usage to the Hugging Face Hub."""


def check_data(config: TrainConfig, train: Sequence[object], val: Sequence[object]) -> None:
    """Training needs examples; early stopping watches validation loss, so it needs validation data."""
    if not train:
        raise InvalidRequest("there are no training examples")
    if config.early_stopping_patience is not None and not val:
        raise InvalidRequest(
            "early_stopping_patience needs validation data: early stopping watches the validation loss",
            param="early_stopping_patience",
        )


def prepare_output(config: TrainConfig, resume: bool | Path) -> Path | None:
    """The checkpoint to resume from, if any; refuses to mix a new run into an old run's directory."""
    from transformers.trainer_utils import get_last_checkpoint

    if config.adapter_dir.exists():
        raise InvalidRequest(
            f"{config.adapter_dir} already holds a finished adapter; choose a new output_dir", param="output_dir"
        )
    existing = (
        get_last_checkpoint(str(config.checkpoint_dir))  # type: ignore[no-untyped-call]
        if config.checkpoint_dir.is_dir()
        else None
    )
    if resume is False:
        if existing is not None:
            raise InvalidRequest(
                f"{config.checkpoint_dir} holds checkpoints of an earlier run; resume it or choose a new output_dir",
                param="output_dir",
            )
        return None
    if resume is True:
        if existing is None:
            raise InvalidRequest(f"no checkpoint to resume from in {config.checkpoint_dir}", param="resume")
        return Path(existing)
    if not (Path(resume) / "trainer_state.json").is_file():
        raise InvalidRequest(f"{resume} is not a training checkpoint (no trainer_state.json)", param="resume")
    return Path(resume)


def run_training(
    trainer: Trainer,
    config: TrainConfig,
    *,
    data: Mapping[str, Any],
    checkpoint: Path | None,
    console: Console,
) -> TrainResult:
    """Train (resuming from ``checkpoint``), write the adapter and its manifest, and print the loss table."""
    from adapters import BaseModelSpec, validate_adapter_dir

    output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    state = trainer.state
    best = Path(state.best_model_checkpoint) if state.best_model_checkpoint else None
    stopped_early = state.global_step < state.max_steps
    runtime = float(output.metrics.get("train_runtime", 0.0))
    result = {
        "global_step": state.global_step,
        "max_steps": state.max_steps,
        "epochs": state.epoch,
        "stopped_early": stopped_early,
        "best_checkpoint_step": _checkpoint_step(best),
        "best_val_loss": state.best_metric,
        "train_loss": output.training_loss,
        "train_runtime_s": runtime,
        "input_tokens": state.num_input_tokens_seen,
        "resumed_from_step": _checkpoint_step(checkpoint),
    }
    manifest = build_manifest(
        method=config.method,
        base_model_dir=config.base_model,
        base_model_name=config.model_name,
        hyperparameters={**config.to_dict(), "peft_config": _peft_config(trainer)},
        seed=config.seed,
        data=data,
        log_history=state.log_history,
        result=result,
    )
    staging = config.output_dir / ".adapter-staging"
    shutil.rmtree(staging, ignore_errors=True)
    save_adapter(trainer, staging)
    write_manifest(staging, manifest)
    _fsync_files(staging)
    # Refuse here, with the registry's own reasons, what the registry would refuse at push.
    validate_adapter_dir(staging, BaseModelSpec.from_model_dir(config.base_model), config.max_lora_rank)
    staging.rename(config.adapter_dir)
    console.print(
        loss_table(
            f"{config.method.upper()} {config.model_name}: {state.global_step} steps"
            + (" (stopped early)" if stopped_early else ""),
            manifest.train_loss,
            manifest.val_loss,
            _checkpoint_step(best),
        )
    )
    console.print(f"Adapter written to [bold]{config.adapter_dir}[/]")
    return TrainResult(
        adapter_dir=config.adapter_dir,
        manifest=manifest,
        global_step=state.global_step,
        stopped_early=stopped_early,
        best_checkpoint=best,
        resumed_from=checkpoint,
    )


def save_adapter(trainer: Trainer, directory: Path) -> None:
    """Only the PEFT config and safetensors weights: no model card, no pickled training_args.bin."""
    scratch = directory.parent / f"{directory.name}.peft"
    shutil.rmtree(scratch, ignore_errors=True)
    peft_model(trainer).save_pretrained(str(scratch), safe_serialization=True)
    directory.mkdir(parents=True)
    for name in ADAPTER_FILES:
        shutil.copyfile(scratch / name, directory / name)
    shutil.rmtree(scratch)


# -- chat templates and data --------------------------------------------------------------------


def training_chat_template(tokenizer: PreTrainedTokenizerBase) -> str:
    """The base chat template with ``{% generation %}`` markers around what the assistant says."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    template = tokenizer.chat_template
    if not isinstance(template, str):
        raise InvalidRequest("the base model's tokenizer has no chat template to render training examples with")
    if has_generation_markers(template):
        return template
    if template in TRAINING_TEMPLATES:
        return TRAINING_TEMPLATES[template]
    try:
        marked = get_training_chat_template(tokenizer)
    except ValueError as e:
        raise InvalidRequest(
            "the base model's chat template has no {% generation %} markers and no known training variant, "
            "so the assistant's tokens cannot be told apart from the prompt's; add a marked copy to "
            "training.sft.TRAINING_TEMPLATES"
        ) from e
    return marked if marked is not None else template


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Mapping[str, str]],
    *,
    template: str | None = None,
    generation_prompt: bool = False,
) -> str:
    """The text a chat template renders for ``messages`` (the tokenizer's own template unless given one)."""
    text = tokenizer.apply_chat_template(
        [dict(m) for m in messages], tokenize=False, add_generation_prompt=generation_prompt, chat_template=template
    )
    assert isinstance(text, str)
    return text


def peft_model(trainer: Trainer) -> PeftModel:
    """The trainer's model, which is always the PEFT-wrapped base here."""
    from peft import PeftModel

    model = trainer.model
    if not isinstance(model, PeftModel):
        raise TypeError(f"expected the trainer to hold a PeftModel, got {type(model).__name__}")
    return model


def check_chat_examples(
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    rows: Sequence[Mapping[str, Any]],
    split: str,
    max_length: int | None = None,
) -> None:
    """Each example renders to the same text with the training template as with the served one, each
    assistant turn's trained span ends on EOS, so the adapter learns to stop, and no example is so long
    that truncation to ``max_length`` would cut its EOS off."""
    eos = tokenizer.eos_token_id
    for index, row in enumerate(rows):
        messages = row["messages"]
        if render_chat(tokenizer, messages) != render_chat(tokenizer, messages, template=template):
            raise InvalidRequest(
                f"{split} example {index}: the training chat template renders it differently from the base "
                "model's template, so the adapter would be trained on text it never sees when served"
            )
        encoded = tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        assert isinstance(encoded, Mapping)
        ids = list(encoded["input_ids"])
        if max_length is not None and len(ids) > max_length:
            raise InvalidRequest(
                f"{split} example {index} is {len(ids)} tokens long, above max_length {max_length}: "
                "truncation would cut its last answer and EOS; raise max_length or shorten the example"
            )
        spans = _spans(ids, list(encoded["assistant_masks"]))
        if not spans:
            raise InvalidRequest(f"{split} example {index} has no assistant message to learn from")
        if any(span[-1] != eos for span in spans):
            raise InvalidRequest(
                f"{split} example {index}: an assistant turn does not end on the EOS token "
                f"{tokenizer.eos_token!r}, so the adapter would not learn to stop"
            )


def _spans(ids: list[int], mask: list[int]) -> list[list[int]]:
    spans: list[list[int]] = []
    previous = 0
    for token, bit in zip(ids, mask, strict=True):
        if bit and not previous:
            spans.append([])
        if bit:
            spans[-1].append(token)
        previous = bit
    return spans


def chat_messages(messages: object, where: str) -> list[dict[str, str]]:
    """A non-empty message list as plain ``{"role", "content"}`` dicts: one schema for every row."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest(f"{where} needs a non-empty message list")
    clean = []
    for message in messages:
        if (
            not isinstance(message, Mapping)
            or not isinstance(message.get("role"), str)
            or not isinstance(message.get("content"), str)
        ):
            raise InvalidRequest(f"{where}: each message needs string 'role' and 'content'")
        clean.append({"role": message["role"], "content": message["content"]})
    return clean


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Silence the datasets library's per-map progress bars while the trainer tokenizes."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _require_bitsandbytes() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise InvalidRequest(
            "peft 'qlora' needs bitsandbytes (pip install 'quiver[training]'); use peft 'lora' without it",
            param="peft",
        ) from e


def _fsync_files(directory: Path) -> None:
    for path in [*directory.iterdir(), directory]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _checkpoint_step(path: Path | None) -> int | None:
    if path is None:
        return None
    try:
        return int(path.name.rsplit("-", 1)[-1])
    except ValueError:
        return None


def _peft_config(trainer: Trainer) -> dict[str, Any]:
    config = peft_model(trainer).peft_config["default"]
    targets = getattr(config, "target_modules", None)
    return {
        "r": getattr(config, "r", None),
        "lora_alpha": getattr(config, "lora_alpha", None),
        "lora_dropout": getattr(config, "lora_dropout", None),
        "target_modules": sorted(targets) if isinstance(targets, set) else targets,
    }
