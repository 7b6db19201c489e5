"""Leakage between splits: examples of val or test that duplicate train (or val), exactly or nearly.

Texts are compared normalized (``normalize_text``) and, for near duplicates, by the Jaccard similarity
of their character 5-grams, found exactly with PPJoin rather than sampled.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from trainingdata.formats import DataError, Example

# Length of the character n-grams compared for near duplicates: long enough that shared words
# in unrelated texts do not look alike, short enough that a typo changes only a few n-grams.
SHINGLE = 5

# Punctuation, symbols and underscores go; letters, digits and spaces stay.
_NOT_WORD = re.compile(r"[^\w\s]|_")


def normalize_text(text: str) -> str:
    """The form duplicates are compared in: NFKC, casefolded, punctuation stripped, whitespace collapsed."""
    text = _NOT_WORD.sub("", unicodedata.normalize("NFKC", text).casefold())
    return " ".join(text.split())


def check_threshold(near_threshold: float | None) -> None:
    """ValueError unless ``near_threshold`` is None (exact duplicates only) or in (0, 1]."""
    if near_threshold is not None and not 0.0 < near_threshold <= 1.0:
        raise ValueError(f"near_threshold must be in (0, 1], not {near_threshold}")


def similar_pairs(texts: Sequence[str], groups: Sequence[int], threshold: float) -> list[tuple[int, int, float]]:
    """Pairs ``(i, j, jaccard)``, ``i < j`` in different groups, whose character 5-gram sets have
    Jaccard similarity >= ``threshold``.

    Exact, not sampled: PPJoin (Xiao et al. 2008). With n-grams ordered rarest first, two sets that
    similar must share one of the first ``|x| - ceil(t|x|) + 1`` n-grams of each, so only those are
    indexed and probed, and rare n-grams have short posting lists; where a shared n-gram sits in
    each set bounds the overlap still possible, which drops most candidates before the set
    intersection. A text is probed only once a text of another group is indexed, so a whole train
    split is indexed without being compared with itself.
    """
    shingles = [
        {text[k : k + SHINGLE] for k in range(max(1, len(text) - SHINGLE + 1))} if text else set() for text in texts
    ]
    frequency: Counter[str] = Counter()
    for grams in shingles:
        frequency.update(grams)
    rank = {gram: r for r, gram in enumerate(sorted(frequency, key=lambda gram: (frequency[gram], gram)))}
    ranked = [sorted(map(rank.__getitem__, grams)) for grams in shingles]
    sizes = [len(ids) for ids in ranked]

    # The 1e-9s keep float error (0.7 * 10 = 7.000000000000001) from pruning a pair exactly at the threshold.
    ratio = threshold / (1.0 + threshold)
    index: defaultdict[int, list[tuple[int, int]]] = defaultdict(list)  # n-gram -> (text, its position there)
    indexed, indexed_per_group = 0, Counter[int]()
    pairs: list[tuple[int, int, float]] = []
    for j, ids in enumerate(ranked):
        size = len(ids)
        if not size:
            continue
        group = groups[j]
        prefix = ids[: size - math.ceil(threshold * size - 1e-9) + 1]
        if indexed > indexed_per_group[group]:
            low, high = threshold * size - 1e-9, size / threshold + 1e-9
            # Overlap found so far per candidate, counted in n-gram order; -1 once it cannot reach the threshold.
            overlap: dict[int, int] = {}
            for position, gram in enumerate(prefix):
                for i, other_position in index.get(gram, ()):
                    if groups[i] == group:
                        continue
                    found = overlap.get(i, 0)
                    if found < 0:
                        continue
                    other_size = sizes[i]
                    needed = math.ceil(ratio * (size + other_size) - 1e-9)
                    possible = found + 1 + min(size - position - 1, other_size - other_position - 1)
                    ok = low <= other_size <= high and possible >= needed
                    overlap[i] = found + 1 if ok else -1
            mine = shingles[j]
            for i in sorted(i for i, found in overlap.items() if found > 0):
                shared = len(mine & shingles[i])
                similarity = shared / (size + sizes[i] - shared)
                if similarity >= threshold - 1e-12:
                    pairs.append((i, j, similarity))
        for position, gram in enumerate(prefix):
            index[gram].append((j, position))
        indexed += 1
        indexed_per_group[group] += 1
    return pairs


SplitName = Literal["train", "val", "test"]


@dataclass(frozen=True, slots=True)
class Overlap:
    """An evaluation example (val or test) that duplicates an example of an earlier split."""

    split: SplitName
    index: int
    example: Example
    other_split: SplitName
    other_index: int
    other: Example
    similarity: float
    exact: bool

    def describe(self, width: int = 60) -> str:
        """One line for a report: where both are, how alike, and the start of the text."""
        text = " ".join(self.example.prompt_text.split())
        text = text if len(text) <= width else text[: width - 3] + "..."
        kind = "same text" if self.exact else f"{self.similarity:.2f} similar"
        return f"{self.split} {self.example.where} ~ {self.other_split} {self.other.where} ({kind}): {text!r}"


@dataclass(frozen=True)
class OverlapReport:
    """Val and test examples that duplicate train (or, for test, val), exactly or nearly."""

    overlaps: tuple[Overlap, ...]
    sizes: Mapping[SplitName, int]
    near_threshold: float | None
    _by_split: Mapping[str, tuple[Overlap, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_split: dict[str, list[Overlap]] = defaultdict(list)
        for overlap in self.overlaps:
            by_split[overlap.split].append(overlap)
        object.__setattr__(self, "_by_split", {name: tuple(found) for name, found in by_split.items()})

    @property
    def exact(self) -> tuple[Overlap, ...]:
        """Overlaps whose normalized prompt text is identical."""
        return tuple(overlap for overlap in self.overlaps if overlap.exact)

    @property
    def near(self) -> tuple[Overlap, ...]:
        """Overlaps similar at or above the threshold but not identical."""
        return tuple(overlap for overlap in self.overlaps if not overlap.exact)

    def leaked(self, split: SplitName) -> tuple[Overlap, ...]:
        """The overlaps of one evaluation split, one per leaked example."""
        return self._by_split.get(split, ())

    def fraction(self, split: SplitName) -> float:
        """Share of a split's examples that duplicate an earlier split."""
        size = self.sizes.get(split, 0)
        return len(self.leaked(split)) / size if size else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Counts per evaluation split, for the training manifest."""
        report: dict[str, Any] = {"near_threshold": self.near_threshold}
        for split in ("val", "test"):
            if split in self.sizes:
                leaked = self.leaked(split)
                report[split] = {
                    "size": self.sizes[split],
                    "exact": sum(overlap.exact for overlap in leaked),
                    "near": sum(not overlap.exact for overlap in leaked),
                    "fraction": round(self.fraction(split), 6),
                }
        return report

    def raise_if_above(self, max_fraction: float, *, examples: int = 5) -> None:
        """Raise ``DataError`` when more than ``max_fraction`` of val or of test duplicates an earlier split."""
        lines: list[str] = []
        shown: list[Overlap] = []
        for split in ("val", "test"):
            leaked = self.leaked(split)
            if not leaked or self.fraction(split) <= max_fraction:
                continue
            exact = sum(overlap.exact for overlap in leaked)
            against = "train" if split == "val" else "train or val"
            near = f", {len(leaked) - exact} near at similarity >= {self.near_threshold}" if self.near_threshold else ""
            lines.append(
                f"{len(leaked)} of {self.sizes[split]} {split} examples ({self.fraction(split):.1%}) duplicate "
                f"{against} ({exact} exact{near}), above the {max_fraction:.1%} allowed"
            )
            shown.extend(leaked[: max(0, examples - len(shown))])
        if lines:
            listed = "\n".join(f"  {overlap.describe()}" for overlap in shown)
            raise DataError(
                "leakage between splits: " + "; ".join(lines) + f"\nfor example:\n{listed}",
                problems=[overlap.describe() for split in ("val", "test") for overlap in self.leaked(split)],
            )


def find_overlaps(
    train: Sequence[Example],
    val: Sequence[Example],
    test: Sequence[Example] | None = None,
    *,
    near_threshold: float | None = 0.9,
) -> OverlapReport:
    """Find val examples that duplicate train, and test examples that duplicate train or val.

    Prompt texts (user turns) are compared after ``normalize_text``: identical is an exact duplicate;
    character 5-gram Jaccard similarity >= ``near_threshold`` is a near duplicate (``None``: exact only).
    Each leaked example is reported once, with its closest earlier match.
    """
    check_threshold(near_threshold)
    splits: list[tuple[SplitName, Sequence[Example]]] = [("train", train), ("val", val)]
    if test is not None:
        splits.append(("test", test))
    # One flat list, split after split, so an earlier split is always indexed before a later one probes it.
    flat: list[tuple[SplitName, int, Example]] = [
        (name, index, example) for name, members in splits for index, example in enumerate(members)
    ]
    texts = [normalize_text(example.prompt_text) for _, _, example in flat]
    order = {name: number for number, (name, _) in enumerate(splits)}

    best: dict[int, Overlap] = {}

    def offer(earlier: int, later: int, similarity: float, exact: bool) -> None:
        current = best.get(later)
        if current is not None and (current.exact, current.similarity) >= (exact, similarity):
            return
        name, index, example = flat[later]
        other_name, other_index, other = flat[earlier]
        best[later] = Overlap(name, index, example, other_name, other_index, other, similarity, exact)

    # Exact duplicates: the first position of each text in each split seen so far; splits come
    # in order, so any split already holding the text is an earlier one.
    first_seen: dict[str, dict[SplitName, int]] = defaultdict(dict)
    for position, text in enumerate(texts):
        name = flat[position][0]
        seen = first_seen[text]
        earlier = next((i for other, i in seen.items() if other != name), None)
        if earlier is not None:
            offer(earlier, position, 1.0, True)
        seen.setdefault(name, position)
    if near_threshold is not None:
        groups = [order[name] for name, _, _ in flat]
        for i, j, similarity in similar_pairs(texts, groups, near_threshold):
            offer(i, j, similarity, False)

    return OverlapReport(
        overlaps=tuple(best[position] for position in sorted(best)),
        sizes={name: len(members) for name, members in splits},
        near_threshold=near_threshold,
    )
