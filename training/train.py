"""``training.train``: from data files to a validated adapter directory, the one entry point of the CLI.

It loads and checks the data (formats, hold-out split, leakage between train, val and test), then
runs SFT or DPO. Pushing to the registry is the caller's step, so training never depends on the gateway.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from training.config import TrainConfig
from training.dpo import train_dpo
from training.sft import TrainResult, train_sft
from trainingdata.formats import ChatExample, PreferenceExample
from trainingdata.leakage import OverlapReport, SplitName
from trainingdata.splits import DEFAULT_MAX_OVERLAP, load_splits

if TYPE_CHECKING:
    from transformers import TrainerCallback


def chat_row(example: ChatExample) -> dict[str, Any]:
    """A chat example as the trainer takes it."""
    return {"messages": [m.to_dict() for m in example.messages]}


def chat_rows(examples: Sequence[ChatExample]) -> list[dict[str, Any]]:
    """The trainer's rows: each example as many times as its (whole) weight says, so weight 0 leaves it out."""
    return [chat_row(e) for e in examples for _ in range(int(e.weight))]


def pair_row(example: PreferenceExample) -> dict[str, Any]:
    """A preference pair in TRL's conversational form."""
    return {
        "prompt": [m.to_dict() for m in example.prompt],
        "chosen": [{"role": "assistant", "content": example.chosen}],
        "rejected": [{"role": "assistant", "content": example.rejected}],
    }


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
    callbacks: Sequence[TrainerCallback] = (),
) -> TrainResult:
    """Train an adapter on ``data`` (held-out split unless ``val`` is given) and return where it was written.

    ``callbacks`` join the trainer's own, e.g. to report progress elsewhere or to stop between steps.
    """
    console = console or Console(stderr=True)
    splits = load_splits(data, config.method, val=val, test=test, val_fraction=val_fraction, seed=config.seed)
    train_set, val_set, report = splits.train, splits.val, splits.report
    _report(report, console)
    files: dict[str, Any] = {**splits.files, "overlaps": report.to_dict()}
    report.raise_if_above(max_overlap)
    console.print(f"training on {len(train_set)} examples, validating on {len(val_set)}")
    if config.method == "dpo":
        rows = [pair_row(e) for e in train_set], [pair_row(e) for e in val_set]
        return train_dpo(config, *rows, data_files=files, resume=resume, console=console, callbacks=callbacks)
    rows = chat_rows(train_set), chat_rows(val_set)
    return train_sft(config, *rows, data_files=files, resume=resume, console=console, callbacks=callbacks)
