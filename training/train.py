"""``training.train``: from data files to a validated adapter directory, the one entry point of the CLI.

It loads and checks the data (formats, hold-out split, leakage between train, val and test), then
runs SFT or DPO. Pushing to the registry is the caller's step, so training never depends on the gateway.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from training.config import TrainConfig
from training.data import (
    ChatExample,
    DataFile,
    OverlapReport,
    PreferenceExample,
    SplitName,
    find_overlaps,
    load_examples,
    split,
)
from training.dpo import train_dpo
from training.sft import TrainResult, train_sft

# Val or test examples that duplicate training ones make the validation loss (and the eval gate) lie.
DEFAULT_MAX_OVERLAP = 0.02


def chat_row(example: ChatExample) -> dict[str, Any]:
    """A chat example as the trainer takes it."""
    return {"messages": [m.to_dict() for m in example.messages]}


def pair_row(example: PreferenceExample) -> dict[str, Any]:
    """A preference pair in TRL's conversational form."""
    return {
        "prompt": [m.to_dict() for m in example.prompt],
        "chosen": [{"role": "assistant", "content": example.chosen}],
        "rejected": [{"role": "assistant", "content": example.rejected}],
    }


def _examples(data: DataFile, method: str) -> tuple[ChatExample, ...] | tuple[PreferenceExample, ...]:
    return data.preference_examples() if method == "dpo" else data.chat_examples()


def _report(report: OverlapReport, console: Console) -> None:
    table = Table(
        "split",
        "examples",
        "exact duplicates",
        "near duplicates",
        title="Leakage check (against train, and val for test)",
    )
    splits: tuple[SplitName, ...] = ("val", "test")
    for name in splits:
        size = report.sizes.get(name, 0)
        if size:
            leaked = report.leaked(name)
            exact = sum(1 for o in leaked if o.exact)
            table.add_row(name, str(size), str(exact), str(len(leaked) - exact))
    console.print(table)


def train(
    config: TrainConfig,
    data: Path,
    *,
    val: Path | None = None,
    test: Path | None = None,
    val_fraction: float = 0.1,
    max_overlap: float = DEFAULT_MAX_OVERLAP,
    resume: bool | Path = False,
    console: Console | None = None,
) -> TrainResult:
    """Train an adapter on ``data`` (held-out split unless ``val`` is given) and return where it was written."""
    console = console or Console(stderr=True)
    train_file = load_examples(data)
    files: dict[str, Any] = {"train": train_file.fingerprint()}
    examples: Sequence[Any] = _examples(train_file, config.method)
    if val is None:
        train_set, val_set = split(examples, val_fraction, config.seed)
        files["val"] = {"split_from": "train", "fraction": val_fraction, "seed": config.seed}
    else:
        val_file = load_examples(val)
        files["val"] = val_file.fingerprint()
        train_set, val_set = tuple(examples), tuple(_examples(val_file, config.method))
    test_set: tuple[Any, ...] | None = None
    if test is not None:
        test_file = load_examples(test)
        files["test"] = test_file.fingerprint()
        test_set = tuple(test_file.examples)
    report = find_overlaps(train_set, val_set, test_set)
    _report(report, console)
    files["overlaps"] = report.to_dict()
    report.raise_if_above(max_overlap)
    console.print(f"training on {len(train_set)} examples, validating on {len(val_set)}")
    if config.method == "dpo":
        rows = [pair_row(e) for e in train_set], [pair_row(e) for e in val_set]
        return train_dpo(config, *rows, data_files=files, resume=resume, console=console)
    rows = [chat_row(e) for e in train_set], [chat_row(e) for e in val_set]
    return train_sft(config, *rows, data_files=files, resume=resume, console=console)
