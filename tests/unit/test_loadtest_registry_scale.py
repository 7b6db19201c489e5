"""The registry-scale benchmark's parts: versions pushed through the registry, model strings, timing, report."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from pathlib import Path

import pytest

from loadtest import registry_scale
from loadtest.bench import Sample

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_every_pushed_version_is_a_valid_adapter_of_its_own_and_every_drawn_model_resolves(
    tiny_base: Path, tmp_path: Path
) -> None:
    layout = registry_scale.Layout(adapters=2, versions=3)
    template = registry_scale.make_template(tiny_base, tmp_path / "template")
    registry_dir = tmp_path / "registry"

    pushed, started, ended = registry_scale.push_versions(
        registry_dir, tiny_base, template, tmp_path / "scratch", range(layout.adapters), layout.versions
    )

    assert pushed == layout.total and started <= ended
    with registry_scale.open_registry(registry_dir, tiny_base) as registry:
        adapters = registry.adapters()
        assert [(a.name, [v.number for v in a.versions]) for a in adapters] == [
            ("scale-0000", [1, 2, 3]),
            ("scale-0001", [1, 2, 3]),
        ]
        assert len({v.sha256 for a in adapters for v in a.versions}) == layout.total
        for model in layout.models(random.Random(0), 10):
            assert registry.resolve(model).lora_name == model
    assert {m.partition("@")[2] for m in layout.models(random.Random(0), 10, alias=True)} == {"staging"}


def test_time_each_counts_failures_apart_from_latencies() -> None:
    sample = registry_scale.time_each(lambda item: item != "bad", ["ok", "bad", "ok", "ok"])
    assert len(sample.latencies) == 3 and sample.errors == 1

    row = registry_scale.latency("x", sample)
    assert row.requests == 4 and 0 <= row.p50_ms <= row.p99_ms and not row.met  # an error misses the target
    assert registry_scale.latency("none", registry_scale.time_each(lambda _: False, ["a"])).p50_ms == 0.0


def test_the_report_marks_each_latency_against_the_target() -> None:
    fast = registry_scale.latency("fast", Sample([0.002] * 10, 0.02, 0))
    slow = registry_scale.latency("slow", Sample([0.050] * 10, 0.5, 0))
    result = registry_scale.Result(100, 100, 2, register_s=125.0, snapshot_s=0.2, latencies=[fast, slow])

    assert result.versions == 10_000 and result.versions_per_s == 80
    [verdict] = registry_scale.verdicts(result)
    assert verdict.measured == "50.00 ms (slow)" and not verdict.met
    assert registry_scale.verdicts(registry_scale.Result(100, 100, 2, 125.0, 0.2, [fast]))[0].met
    text = registry_scale.markdown(result, datetime(2026, 1, 2, tzinfo=UTC))
    assert "**125 s (80 versions/s)**" in text
    assert "| fast | 10 | 2.00 ms | 2.00 ms | 0 | met (< 20 ms) |" in text and "**missed**" in text


def test_the_cold_start_is_a_verdict_of_its_own_on_the_median_start() -> None:
    fast = registry_scale.latency("fast", Sample([0.002] * 10, 0.02, 0))
    result = registry_scale.Result(100, 100, 2, 125.0, 0.2, [fast], cold_start_s=[1.2, 2.9, 1.4])

    [_, cold] = registry_scale.verdicts(result)
    assert cold.measured == "1.40 s (each: 1.20, 2.90, 1.40)" and cold.met and "10,000 versions" in cold.comparison
    assert not registry_scale.verdicts(registry_scale.Result(100, 100, 2, 125.0, 0.2, [fast], [1.6]))[1].met
    assert "median **1.40 s**" in registry_scale.markdown(result, datetime(2026, 1, 2, tzinfo=UTC))
