"""The promotion gate: ``name@prod`` only for a version whose eval report beats the best baseline by a margin.

The report is what ``quiver eval`` stores with the version (``training.eval``): ``scores`` per system in
metric points, ``best_baseline`` and ``margin`` (adapter minus best baseline). The registry reads only
those keys, so it does not depend on the training package.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from adapters.catalog import AdapterVersion

# Aliases that serve real traffic by default (a bare name means name@prod).
PROMOTED_ALIASES = frozenset({"prod"})
DEFAULT_MARGIN = 5.0


def promotion_refusal(version: AdapterVersion, margin: float) -> str | None:
    """Why ``version`` may not be promoted, or None when its latest eval report clears ``margin`` points."""
    report = version.evaluation
    if report is None:
        return (
            f"{version.lora_name} has no eval report; run `quiver eval {version.lora_name} --test FILE --train FILE` "
            "first (or force the promotion)"
        )
    try:
        scores: Mapping[str, Any] = report["scores"]
        best = str(report["best_baseline"])
        gained = float(scores["adapter"]) - float(scores[best])
    except (KeyError, TypeError, ValueError):
        return f"{version.lora_name}'s eval report is malformed; run `quiver eval` again (or force the promotion)"
    if gained >= margin:
        return None
    metric = report.get("metric", "the task metric")
    return (
        f"{version.lora_name} scores {float(scores['adapter']):.1f} on {metric} against {float(scores[best]):.1f} "
        f"for the best baseline ({best}): {gained:+.1f} points, below the {margin:g}-point promotion margin "
        "(force the promotion to override)"
    )
