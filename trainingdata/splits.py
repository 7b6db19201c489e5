"""Splitting: the examples a run trains and validates on, a seeded hold-out that keeps duplicates together, a
leakage report.

``training.train`` runs ``load_splits`` before training, and the fine-tuning jobs API runs it while a job is
``validating_files``, so a job with unusable data fails in seconds with the same reasons, not after
the model has loaded. It needs no model, tokenizer or torch.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainingdata.formats import ChatExample, DataError, DataFile, E, PreferenceExample, load_examples
from trainingdata.leakage import OverlapReport, check_threshold, find_overlaps, normalize_text, similar_pairs

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


def split(
    examples: Sequence[E],
    val_fraction: float = 0.1,
    seed: int = 0,
    *,
    near_threshold: float | None = 0.9,
) -> tuple[tuple[E, ...], tuple[E, ...]]:
    """Hold out about ``val_fraction`` of the examples, seeded and deterministic; returns ``(train, val)``.

    Duplicates (exact, and near at ``near_threshold``; ``None`` for exact only) stay on one side,
    so the split itself never leaks. The hold-out is therefore at most, and usually exactly,
    ``round(len(examples) * val_fraction)`` examples. Both sides keep the input order.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1, not {val_fraction}")
    check_threshold(near_threshold)
    wanted = max(1, round(len(examples) * val_fraction))
    if len(examples) < 2 or wanted >= len(examples):
        raise DataError(f"{len(examples)} examples are too few to hold out {val_fraction:.0%} for validation")

    # Union-find over duplicates: each component is a group that must not be split.
    parent = list(range(len(examples)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    texts = [normalize_text(example.prompt_text) for example in examples]
    first_seen: dict[str, int] = {}
    for i, text in enumerate(texts):
        parent[root(i)] = root(first_seen.setdefault(text, i))
    if near_threshold is not None:
        for i, j, _ in similar_pairs(texts, range(len(texts)), near_threshold):
            parent[root(j)] = root(i)

    members: dict[int, list[int]] = defaultdict(list)
    for i in range(len(examples)):
        members[root(i)].append(i)
    groups = list(members.values())  # in order of first member, so the shuffle alone decides
    random.Random(seed).shuffle(groups)
    held_out: set[int] = set()
    for group in groups:
        if len(held_out) + len(group) <= wanted:
            held_out.update(group)
        if len(held_out) == wanted:
            break
    if not held_out:
        raise DataError(
            f"cannot hold out {wanted} examples: every group of duplicate examples is larger than that; "
            "deduplicate the data or pass a validation file"
        )
    train = tuple(example for i, example in enumerate(examples) if i not in held_out)
    val = tuple(example for i, example in enumerate(examples) if i in held_out)
    return train, val


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
