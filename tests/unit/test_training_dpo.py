"""DPO with TRL + PEFT on the tiny SmolLM2-vocabulary Llama: trains, writes the same adapter contract as SFT,
trains the EOS that ends each answer, and refuses malformed pairs by name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from adapters import BaseModelSpec, validate_adapter_dir
from core.errors import InvalidRequest
from tests.factories import ADAPTER_FILES, output_of, quiet
from tests.factories import train_config as config
from training.config import TrainConfig
from training.dpo import dpo_trainer, train_dpo
from training.manifest import read_manifest


def pair(prompt: str, chosen: str, rejected: str) -> dict[str, Any]:
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


PAIRS = [pair(f"Repeat {w}", f"{w} {w}", "no") for w in ("apple", "pear", "plum", "fig")]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def dpo_config(base: Path, out: Path, **changes: Any) -> TrainConfig:
    return config(base, out, method="dpo", **{"max_steps": 3, "save_steps": 2, "batch_size": 2, **changes})


def test_dpo_trains_and_writes_a_servable_adapter_with_its_manifest(tiny_base: Path, tmp_path: Path) -> None:
    console = quiet()
    result = train_dpo(dpo_config(tiny_base, tmp_path / "run", beta=0.2), PAIRS, PAIRS[:2], console=console)

    assert result.global_step == 3
    assert {p.name for p in result.adapter_dir.iterdir()} == ADAPTER_FILES
    assert json.loads((result.adapter_dir / "adapter_config.json").read_text())["r"] == 8
    validate_adapter_dir(result.adapter_dir, BaseModelSpec.from_model_dir(tiny_base), 16)
    manifest = read_manifest(result.adapter_dir)
    assert manifest.method == "dpo" and manifest.hyperparameters["beta"] == 0.2
    assert manifest.data["train"]["examples"] == len(PAIRS)
    # DPO starts at log(2): the adapter starts as a no-op, so chosen and rejected are equally likely.
    assert manifest.train_loss[0].loss == pytest.approx(0.6931, abs=1e-3)
    assert manifest.train_loss[-1].loss < manifest.train_loss[0].loss
    assert [p.step for p in manifest.val_loss] == [2, 3]
    printed = output_of(console)
    assert "DPO" in printed and "val loss" in printed


def test_each_answer_and_its_eos_are_the_completion_even_though_pad_is_eos(tiny_base: Path, tmp_path: Path) -> None:
    pairs = [pair("Hi", "Hello there, friend", "No"), pair("Hi", "Yo", "Go away now please")]
    trainer = dpo_trainer(dpo_config(tiny_base, tmp_path / "run"), pairs, console=quiet())
    tok: Any = trainer.processing_class
    dataset: Any = trainer.train_dataset
    assert tok.pad_token_id == tok.eos_token_id

    batch = trainer.data_collator([dataset[i] for i in range(len(pairs))])
    # Rows: the chosen answers of both pairs, then their rejected answers.
    answers = [p["chosen"][0]["content"] for p in pairs] + [p["rejected"][0]["content"] for p in pairs]
    for row, answer in enumerate(answers):
        ids = batch["input_ids"][row].tolist()
        completion = [i for i, bit in zip(ids, batch["completion_mask"][row].tolist(), strict=True) if bit]
        assert tok.decode(completion) == f"{answer}<|im_end|>\n"
        padded = [i for i, bit in enumerate(batch["attention_mask"][row].tolist()) if not bit]
        assert all(ids[i] == tok.eos_token_id and not batch["completion_mask"][row][i] for i in padded)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"prompt": [], "chosen": [], "rejected": []}, "train pair 1 'prompt' needs a non-empty message list"),
        (
            {**pair("q", "a", "b"), "chosen": [{"role": "user", "content": "a"}]},
            "train pair 1: 'chosen' must hold assistant messages only",
        ),
        (
            {**pair("q", "a", "b"), "prompt": [{"role": "assistant", "content": "q"}]},
            "the prompt must end with a user (or system) message",
        ),
        ({**pair("q", "a", "b"), "rejected": [{"role": "assistant"}]}, "each message needs string 'role'"),
    ],
)
def test_malformed_pairs_are_refused_by_name(
    bad: dict[str, Any], message: str, tiny_base: Path, tmp_path: Path
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        dpo_trainer(dpo_config(tiny_base, tmp_path), [PAIRS[0], bad])
    assert message in caught.value.message


def test_pairs_that_truncation_would_cut_are_refused(tiny_base: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="train pair 0: prompt and 'chosen' answer are [0-9]+ tokens long"):
        dpo_trainer(dpo_config(tiny_base, tmp_path, max_length=16), PAIRS)


def test_each_trainer_takes_only_its_own_method(tiny_base: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="train_dpo needs method 'dpo'"):
        train_dpo(config(tiny_base, tmp_path), PAIRS, console=quiet())
