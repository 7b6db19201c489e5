"""Where benchmark results go: one JSON file per day in ``bench/results/`` and ``BENCHMARKS.md``.

Every benchmark owns one key of the day's JSON and one ``## `` section of BENCHMARKS.md and rewrites only
those, so ``quiver bench --only training`` leaves the gateway's last numbers in place and vice versa. Each
also hands in its verdicts (measured value next to target); the ``## Summary`` section at the top lists
every verdict recorded that day.
"""

from __future__ import annotations

import json
import os
import platform
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

PREAMBLE = (
    "# Benchmarks\n\n"
    "Written by `make bench` (`quiver bench`; `quiver bench --only NAME` reruns one section). Every comparison\n"
    "measures both sides in the same run, alternating them, so drift on the machine hits both alike. Each\n"
    "section says when and where it was measured."
)
SUMMARY = "Summary"


@dataclass(frozen=True)
class Verdict:
    """One row of the summary: what was compared, the measured ratio or value, its target, met or not."""

    comparison: str
    measured: str
    target: str
    met: bool


def record(
    out_dir: Path,
    results: Mapping[str, Any],
    heading: str,
    section: str,
    now: datetime | None = None,
    verdicts: Sequence[Verdict] = (),
) -> Path:
    """Merge ``results`` into today's JSON, put ``section`` under ``## heading`` in BENCHMARKS.md, and
    ``verdicts`` (replacing this heading's earlier ones) in the summary.

    BENCHMARKS.md lives two levels above ``out_dir`` (the repository root for ``bench/results``).
    Returns the JSON file's path.
    """
    now = now or datetime.now(UTC)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{now:%Y-%m-%d}.json"
    payload: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    payload.update(
        {"created": now.isoformat(), "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}
    )
    payload.update(results)
    summary: dict[str, list[dict[str, Any]]] = payload.setdefault("summary", {})
    if verdicts:
        summary[heading] = [asdict(v) for v in verdicts]
    _atomic_write(path, json.dumps(payload, indent=2) + "\n")
    markdown = out_dir.parent.parent / "BENCHMARKS.md"
    text = replace_section(markdown.read_text() if markdown.is_file() else "", heading, section)
    if summary:
        text = replace_section(text, SUMMARY, summary_table(summary, now))
    _atomic_write(markdown, text)
    return path


def summary_table(summary: Mapping[str, Sequence[Mapping[str, Any]]], now: datetime) -> str:
    """The summary section: every verdict recorded today, grouped by the section that measured it."""
    rows = [v for heading in summary for v in summary[heading]]
    met = sum(1 for v in rows if v["met"])
    lines = [
        f"Measured on {now:%Y-%m-%d} ({os.cpu_count()} CPUs{', no GPU' if not _has_gpu() else ''}): "
        f"{met} of {len(rows)} targets met. Details and plots in the sections below.",
        "",
        "| comparison | measured | target | |",
        "|---|---:|---|---|",
        *(
            f"| {v['comparison']} | {v['measured']} | {v['target']} | {'met' if v['met'] else '**missed**'} |"
            for v in rows
        ),
    ]
    return "\n".join(lines)


def _has_gpu() -> bool:
    import shutil

    return shutil.which("nvidia-smi") is not None


def replace_section(text: str, heading: str, body: str) -> str:
    """``text`` (a BENCHMARKS.md) with the ``## heading`` section's body replaced, or the section appended."""
    sections = re.split(r"(?m)^(?=## )", text)[1:]
    new = f"## {heading}\n\n{body.strip()}"
    kept = [s.strip() for s in sections]
    titles = [s.splitlines()[0] for s in kept]
    if f"## {heading}" in titles:
        kept[titles.index(f"## {heading}")] = new
    elif heading == SUMMARY:
        kept.insert(0, new)
    else:
        kept.append(new)
    return "\n\n".join([PREAMBLE, *kept]) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    # A reader (or a crash) never sees half a file: write beside it, then rename over it.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
