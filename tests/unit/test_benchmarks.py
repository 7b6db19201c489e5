"""Benchmark results: each `quiver bench` section rewrites only its own part of the day's JSON and BENCHMARKS.md,
and the training comparison runs both sides and records their ratio (never asserted: benchmarks are not tests)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from core import benchmarks
from tests.factories import output_of, quiet

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def test_a_section_is_replaced_and_the_others_are_kept(tmp_path: Path) -> None:
    results = tmp_path / "bench" / "results"
    benchmarks.record(results, {"gateway_vs_direct": [1]}, "Gateway", "gateway table v1", NOW)
    benchmarks.record(results, {"training": {"ratio": 1.7}}, "Training", "training table", NOW)
    path = benchmarks.record(results, {"gateway_vs_direct": [2]}, "Gateway", "gateway table v2", NOW)

    payload = json.loads(path.read_text())
    assert path.name == "2026-11-23.json"
    assert payload["gateway_vs_direct"] == [2] and payload["training"] == {"ratio": 1.7}
    markdown = (tmp_path / "BENCHMARKS.md").read_text()
    assert markdown.startswith("# Benchmarks\n")
    assert markdown.index("## Gateway\n\ngateway table v2") < markdown.index("## Training\n\ntraining table")
    assert "v1" not in markdown and markdown.count("## ") == 2


def test_the_summary_lists_every_sections_verdicts_first_and_replaces_a_rerun(tmp_path: Path) -> None:
    results = tmp_path / "bench" / "results"
    slow = benchmarks.Verdict("merged vs base", "0.90x", ">= 0.95x", False)
    fast = benchmarks.Verdict("merged vs base", "1.40x", ">= 0.95x", True)
    naive = benchmarks.Verdict("quiver vs naive", "7.1x", ">= 5x", True)
    benchmarks.record(results, {"merged": 1}, "Merged", "merged table", NOW, [slow])
    benchmarks.record(results, {"naive": 1}, "Naive", "naive table", NOW, [naive])
    path = benchmarks.record(results, {"merged": 2}, "Merged", "merged table v2", NOW, [fast])

    markdown = (tmp_path / "BENCHMARKS.md").read_text()
    summary = markdown.split("## ")[1]
    assert summary.startswith("Summary\n") and "2 of 2 targets met" in summary
    assert "| merged vs base | 1.40x | >= 0.95x | met |" in summary and "0.90x" not in markdown
    assert "| quiver vs naive | 7.1x | >= 5x | met |" in summary
    assert json.loads(path.read_text())["summary"]["Naive"][0]["measured"] == "7.1x"


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_training_bench_times_both_sides_and_records_the_ratio(tiny_base: Path, tmp_path: Path) -> None:
    pytest.importorskip("trl", reason="the training bench needs trl (the training extra)")
    from training import bench

    console = quiet()
    result = bench.run(tiny_base, tmp_path / "bench" / "results", console, steps=1, rounds=1)

    assert [(r.side, r.steps) for r in result.runs] == [("quiver", 1), ("trl", 1)]
    assert all(r.tokens > 0 and r.seconds > 0 for r in result.runs)
    recorded = json.loads(next((tmp_path / "bench" / "results").glob("*.json")).read_text())["training"]
    assert recorded["ratio"] == round(result.ratio, 3) and recorded["target_ratio"] == bench.TARGET_RATIO
    assert f"## {bench.HEADING}" in (tmp_path / "BENCHMARKS.md").read_text()
    assert "quiver / trl" in output_of(console)
