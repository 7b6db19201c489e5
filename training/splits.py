"""The examples a run trains and validates on: data files loaded for the method, a hold-out split, a leakage report.

``training.train`` runs this before training, and the fine-tuning jobs API runs it while a job is
``validating_files``, so a job with unusable data fails in seconds with the same reasons, not after
the model has loaded. It needs no model, tokenizer or torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.data import (
    ChatExample,
    DataFile,
    OverlapReport,
    PreferenceExample,
    find_overlaps,
    load_examples,
    split,
)

# Val or test examples that duplicate training ones make the validation loss (and the eval gate) lie.
DEFAULT_MAX_OVERLAP = 0.02


@dataclass(frozen=True)
class Splits:
    """Train, val (and test) examples, what the manifest records about their files, and the leakage report."""

    train: tuple[Any, ...]
    val: tuple[Any, ...]
    test: tuple[Any, ...] | None
    files: Mapping[str, Any]
    report: OverlapReport


def examples_for(data: DataFile, method: str) -> tuple[ChatExample, ...] | tuple[PreferenceExample, ...]:
    """The file's examples as ``method`` trains on them; a ``DataError`` if the file holds the other kind."""
    return data.preference_examples() if method == "dpo" else data.chat_examples()


def load_splits(
    data: Path,
    method: str,
    *,
    val: Path | None = None,
    test: Path | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> Splits:
    """Load ``data`` (and ``val``, ``test``) for ``method``; without ``val``, hold out ``val_fraction`` of ``data``.

    Raises ``DataError`` for unusable files; the leakage report is returned, not enforced, so the
    caller can show it before ``report.raise_if_above``.
    """
    train_file = load_examples(data)
    files: dict[str, Any] = {"train": train_file.fingerprint()}
    examples = examples_for(train_file, method)
    if val is None:
        train_set, val_set = split(examples, val_fraction, seed)
        files["val"] = {"split_from": "train", "fraction": val_fraction, "seed": seed}
    else:
        val_file = load_examples(val)
        files["val"] = val_file.fingerprint()
        train_set, val_set = tuple(examples), tuple(examples_for(val_file, method))
    test_set: tuple[Any, ...] | None = None
    if test is not None:
        test_file = load_examples(test)
        files["test"] = test_file.fingerprint()
        test_set = tuple(test_file.examples)
    report = find_overlaps(train_set, val_set, test_set)
    return Splits(train=tuple(train_set), val=tuple(val_set), test=test_set, files=files, report=report)
