"""The gateway section of `quiver bench` (``loadtest.bench``): turns, rows, verdicts and the bodies it sends; and
one short alternating run over real processes (the instant upstream and the floor). Nothing here is timed."""

from __future__ import annotations

import asyncio
import json
from contextlib import ExitStack
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from loadtest import bench, floor, instant_upstream
from loadtest.bench import Memory, Result, Row, Sample, Side, SideRow, Workload


def sample(per_round: list[float], cpu_s: float = 0.0, latency_s: float = 0.001) -> Sample:
    return Sample([latency_s] * 10, 1.0, 0, cpu_s, per_round)


def test_each_side_leads_a_round_in_turn_and_every_side_runs_in_every_round() -> None:
    sides = [Side(name, f"http://{name}") for name in bench.SIDES]

    orders = [[s.name for s in bench.turns(sides, r)] for r in range(4)]

    assert [o[0] for o in orders] == ["direct", "floor", "gateway", "direct"]
    assert all(sorted(o) == sorted(bench.SIDES) for o in orders)


def test_a_row_pairs_each_round_with_the_direct_sides_and_counts_cpu_only_where_it_was_read() -> None:
    samples = {
        "direct": sample([100.0, 200.0], latency_s=0.001),
        "floor": sample([90.0, 190.0], cpu_s=0.01, latency_s=0.002),
        "gateway": sample([50.0, 180.0], cpu_s=0.02, latency_s=0.004),
    }

    row = bench.row("instant", 1, samples, {"floor", "gateway"})

    assert row.sides["gateway"].ratios == [0.5, 0.9] and row.sides["gateway"].ratio == 0.7
    assert row.sides["floor"].cpu_ms_per_request == 1.0 and row.sides["gateway"].cpu_ms_per_request == 2.0
    assert row.sides["direct"].cpu_ms_per_request is None
    assert row.added_ms("gateway") == (3.0, 3.0) and row.added_ms("floor") == (1.0, 1.0)
    assert row.vs_floor(lambda s: s.cpu_ms_per_request) == 2.0


def side_row(ratio: float = 1.0, cpu_ms: float | None = 1.0, rps: float = 100.0, p50_ms: float = 1.0) -> SideRow:
    return SideRow(p50_ms, p50_ms * 2, rps, [ratio, ratio - 0.01, ratio + 0.01], cpu_ms, 0)


def result(
    gateway_cpu_ms: float = 1.2,
    gateway_rps: float = 95.0,
    vllm_ratio: float = 0.98,
    rss: tuple[float, float] = (120, 250),
) -> Result:
    workload = Workload()
    direct = side_row(cpu_ms=None)

    def instant(concurrency: int) -> Row:
        sides = {
            "direct": direct,
            "floor": side_row(p50_ms=1.3),
            "gateway": side_row(0.9, gateway_cpu_ms, gateway_rps, 1.5),
        }
        return Row("instant", concurrency, 100, sides)

    def vllm(concurrency: int) -> Row:
        return Row("vLLM", concurrency, 100, {"direct": direct, "floor": side_row(), "gateway": side_row(vllm_ratio)})

    rows = [instant(1), instant(workload.saturation), vllm(1), vllm(workload.vllm_concurrency)]
    memory = Memory(rss[0], rss[1], rss[1], 45.0, 120.0, 45.0, 4, {"adapters": 0, "auto and RAG": 0})
    return Result(workload, rows, memory, [bench.Refusal("over", 9, 2, [413], 4.0)])


def test_the_verdicts_hold_the_gateway_to_the_floor_and_to_vllm_direct() -> None:
    met = {v.comparison: v for v in bench.verdicts(result())}
    assert all(v.met for v in met.values()), [v for v in met.values() if not v.met]
    assert len(met) == 8
    cpu = next(v for v in met.values() if "CPU time per request at concurrency 1 " in v.comparison)
    assert cpu.measured == "1.20x (1.200 ms vs 1.000 ms)" and cpu.target == "<= 1.3x"
    vllm = next(v for v in met.values() if "vLLM direct, throughput at concurrency 16" in v.comparison)
    assert vllm.measured.startswith("0.980x (0.970-0.990); floor 1.000x") and "median of 3 rounds" in vllm.comparison

    missed = [v.comparison for v in bench.verdicts(result(1.4, 85.0, 0.96, (151, 301))) if not v.met]
    assert len(missed) == 7 and not any("added p50" in c for c in missed)


def test_failed_requests_miss_the_memory_targets_whatever_the_memory() -> None:
    failing = result()
    failing = replace(failing, memory=replace(failing.memory, errors={"adapters": 0, "auto and RAG": 1}))

    memory = [v for v in bench.verdicts(failing) if "RSS" in v.comparison]

    assert [v.met for v in memory] == [True, False] and memory[1].measured.endswith(", 1 failed requests")


def test_the_section_shows_every_side_and_the_refusals() -> None:
    text = bench.markdown(result(), datetime(2026, 1, 2, tzinfo=UTC))

    assert (
        "| instant | 1 | gateway | 1.50 ms | +0.50 ms | +1.00 ms | 95.0 | 0.900x (0.890-0.910) | 1.200 ms | 0 |" in text
    )
    assert "| over | 9 | 413 | 4.0 ms |" in text and "| floor (vLLM) | after the comparisons | 45.0 MiB |" in text


def test_a_padded_request_has_exactly_the_size_asked_and_stays_a_chat_request() -> None:
    body = bench.padded_chat("base", 4096)

    assert len(body) == 4096
    payload = json.loads(body)
    assert payload["model"] == "base" and len(payload["messages"][0]["content"]) > 3900


def test_a_scaled_workload_keeps_its_rounds_and_at_least_one_request_in_flight_each() -> None:
    small = Workload().scaled(0.01)

    assert small.rounds == Workload().rounds and small.instant_requests == 1
    assert small.saturation_requests == small.saturation and small.vllm_concurrent_requests == small.vllm_concurrency


def test_alternating_rounds_over_the_instant_upstream_and_the_floor(tmp_path: Path) -> None:
    with ExitStack() as stack:
        upstream = instant_upstream.start(stack, tmp_path)
        url, process = floor.start(stack, upstream, tmp_path, "test")
        sides = [Side("direct", upstream), Side("floor", url, process)]

        samples = asyncio.run(bench.alternate(sides, instant_upstream.MODEL, 2, 6, rounds=3))

    assert {name: (len(s.latencies), s.errors, len(s.per_round)) for name, s in samples.items()} == {
        "direct": (18, 0, 3),
        "floor": (18, 0, 3),
    }
