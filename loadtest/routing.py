"""Routing benchmarks: adapter affinity vs round-robin over two replicas, and merged vs unmerged vs base.

Affinity vs round-robin: two vLLM replicas of the base, each with room for ``slots`` adapters, and more
adapters than all slots together, requested with Zipf popularity. Two gateways over the same replicas
and registry differ only in ``QUIVER_PLACEMENT``; rounds alternate between them with the same request
sequence. Reported: completion tokens/s, adapter loads per minute (the gateways' own counters), errors.

Merged vs unmerged vs base: one adapter served three ways with the same streamed prompts, alternating:
the merged model on a vLLM of its own (LoRA off), the adapter on the LoRA pool, the base model on the
pool. Reported: completion tokens/s and time to first token (p50).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from core import benchmarks
from loadtest import fixtures
from loadtest.bench import start_gateway

PROMPTS = (
    "Write a short sentence about the sea.",
    "Name three colours.",
    "What is two plus two?",
    "Describe a cat in five words.",
    "Give me a word that rhymes with light.",
    "Say hello in French.",
)
TARGET_MERGED_VS_BASE = 0.95


@dataclass
class Run:
    """What one target did over all its rounds."""

    tokens: int = 0
    wall_s: float = 0.0
    errors: int = 0
    ttft_s: list[float] = field(default_factory=list)
    loads: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0

    @property
    def loads_per_min(self) -> float:
        return 60 * self.loads / self.wall_s if self.wall_s else 0.0

    def ttft_p50_ms(self) -> float:
        ordered = sorted(self.ttft_s)
        return 1000 * ordered[len(ordered) // 2] if ordered else 0.0


def zipf_sequence(models: Sequence[str], n: int, seed: int, s: float = 1.1) -> list[str]:
    """``n`` model names drawn with Zipf popularity (the first is the most popular)."""
    weights = [1 / (rank + 1) ** s for rank in range(len(models))]
    return random.Random(seed).choices(list(models), weights=weights, k=n)


async def drive(url: str, models: Sequence[str], concurrency: int, max_tokens: int, out: Run) -> None:
    """Send one streamed chat request per entry of ``models`` (in order) with ``concurrency`` in flight."""
    queue = list(enumerate(models))
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def worker() -> None:
            while queue:
                i, model = queue.pop(0)
                body = {
                    "model": model,
                    "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "ignore_eos": True,  # every answer has the same length, so targets do the same work
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                started = time.perf_counter()
                first: float | None = None
                async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                    if response.status_code != 200:
                        await response.aread()
                        out.errors += 1
                        continue
                    async for line in response.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if first is None and chunk.get("choices"):
                            first = time.perf_counter() - started
                        if chunk.get("usage"):
                            out.tokens += chunk["usage"]["completion_tokens"]
                if first is not None:
                    out.ttft_s.append(first)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        out.wall_s += time.perf_counter() - started


def adapter_loads(gateway_url: str) -> float:
    """The gateway's successful adapter loads so far, over every adapter and replica."""
    text = httpx.get(f"{gateway_url}/metrics", timeout=10).text
    pattern = r'^quiver_adapter_loads_total\{[^}]*outcome="ok"[^}]*\} ([0-9.e+]+)$'
    return sum(float(v) for v in re.findall(pattern, text, flags=re.MULTILINE))


Side = tuple[str, Callable[[int], list[str]]]  # (URL, round number -> the round's model sequence)


async def alternate(
    sides: Mapping[str, Side], *, rounds: int, concurrency: int, max_tokens: int, count_loads: bool = False
) -> dict[str, Run]:
    """Alternate rounds over ``sides`` (label -> side), reversing the order every other round; ``count_loads``
    reads each side's adapter loads from its /metrics (Quiver gateways only)."""
    runs = {name: Run() for name in sides}
    for r in range(rounds):
        order = list(sides.items()) if r % 2 == 0 else list(sides.items())[::-1]
        for name, (url, sequence) in order:
            before = adapter_loads(url) if count_loads else 0.0
            await drive(url, sequence(r), concurrency, max_tokens, runs[name])
            runs[name].loads += adapter_loads(url) - before if count_loads else 0.0
    return runs


async def compare_placement(
    gateways: dict[str, str], models: Sequence[str], *, rounds: int, requests: int, concurrency: int, max_tokens: int,
    count_loads: bool = True,
) -> dict[str, Run]:  # fmt: skip
    """Alternate rounds between servers (label -> URL) with the same Zipf request sequence."""

    def zipf(r: int) -> list[str]:
        return zipf_sequence(models, requests, seed=r)

    sides = {name: (url, zipf) for name, url in gateways.items()}
    return await alternate(
        sides, rounds=rounds, concurrency=concurrency, max_tokens=max_tokens, count_loads=count_loads
    )


async def compare_targets(
    targets: dict[str, tuple[str, str]], *, rounds: int, requests: int, concurrency: int, max_tokens: int
) -> dict[str, Run]:
    """Alternate rounds between targets (label -> (URL, model)) with the same prompts."""

    def repeat(model: str) -> Callable[[int], list[str]]:
        return lambda _round: [model] * requests

    sides = {name: (url, repeat(model)) for name, (url, model) in targets.items()}
    return await alternate(sides, rounds=rounds, concurrency=concurrency, max_tokens=max_tokens)


def start_vllm(
    stack: ExitStack, model: Path, work: Path, name: str, *, slots: int, rank: int = 8, lora: bool = True,
    extra_args: tuple[str, ...] = (),
) -> Any:  # fmt: skip
    """Launch a vLLM for a benchmark (stopped when ``stack`` closes) without waiting for it: the caller waits,
    so two can start side by side. ``rank``: the bench adapters' rank, which vLLM pads every adapter to."""
    from core.processes import free_port
    from core.vllm_server import VllmServer

    server = VllmServer(
        model=str(model),
        served_name=model.name if lora else name,
        port=free_port(),
        log_path=work / f"vllm-{name}.log",
        max_loras=slots,
        max_lora_rank=rank,
        enable_lora=lora,
        extra_args=extra_args,
    )
    server.start()
    stack.callback(server.stop)
    return server


def ready_vllm(
    stack: ExitStack, base_dir: Path, work: Path, name: str, *, slots: int, lora: bool = True, rank: int = 8
) -> str:
    """A vLLM for a benchmark (stopped when ``stack`` closes), once it answers; returns its URL."""
    server = start_vllm(stack, base_dir, work, name, slots=slots, rank=rank, lora=lora)
    server.wait_ready()
    return str(server.url)


def run_placement(
    base_dir: Path, adapter_dirs: Sequence[Path], out_dir: Path, console: Console, *, slots: int = 2, rounds: int = 4,
    requests: int = 48, concurrency: int = 8, max_tokens: int = 16,
) -> dict[str, Run]:  # fmt: skip
    """Affinity vs round-robin over two fresh replicas with ``slots`` adapter slots each; prints and records."""
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="quiver-bench-routing-") as tmp:
        work = Path(tmp)
        with console.status("Starting two vLLM replicas"):
            urls = [ready_vllm(stack, base_dir, work, f"r{i}", slots=slots) for i in range(2)]
        gateways = {}
        with console.status("Starting two gateways (affinity, round_robin)"):
            for placement in ("affinity", "round_robin"):
                env = {"QUIVER_PLACEMENT": placement, "QUIVER_MAX_LORAS": str(slots), "QUIVER_FINE_TUNING_WORKERS": "0"}
                gateways[placement] = start_gateway(stack, ",".join(urls), work, placement, env, data="shared")
        names = [f"bench-{i}" for i in range(len(adapter_dirs))]
        for name, directory in zip(names, adapter_dirs, strict=True):
            fixtures.push(gateways["affinity"], name, directory)
        time.sleep(2)  # the round-robin gateway sees the shared registry on its next refresh
        with console.status(f"{rounds} alternating rounds of {requests} Zipf requests over {len(names)} adapters"):
            runs = asyncio.run(
                compare_placement(
                    gateways, names, rounds=rounds, requests=requests, concurrency=concurrency, max_tokens=max_tokens
                )
            )
    config = {"adapters": len(names), "replicas": 2, "slots_per_replica": slots, "rounds": rounds,
              "requests_per_round": requests, "concurrency": concurrency, "max_tokens": max_tokens}  # fmt: skip
    _report_placement(runs, config, out_dir, console)
    return runs


def _report_placement(runs: dict[str, Run], config: dict[str, int], out_dir: Path, console: Console) -> None:
    affinity, rr = runs["affinity"], runs["round_robin"]
    ratio = affinity.tokens_per_s / rr.tokens_per_s if rr.tokens_per_s else 0.0
    table = Table(
        title="Adapter affinity vs round-robin, two replicas, more adapters than slots (target: affinity wins)"
    )
    for column in ("placement", "tokens/s", "adapter loads/min", "errors"):
        table.add_column(column, justify="right")
    for name, run in runs.items():
        table.add_row(name, f"{run.tokens_per_s:.1f}", f"{run.loads_per_min:.1f}", str(run.errors))
    console.print(table)
    console.print(f"affinity / round-robin throughput: {ratio:.2f}x")
    now = datetime.now(UTC)
    lines = [
        f"Measured on {now:%Y-%m-%d} ({os.cpu_count()} CPUs, no GPU): {config['adapters']} adapters, 2 vLLM replicas "
        f"with {config['slots_per_replica']} adapter slots each, Zipf popularity, {config['concurrency']} in flight, "
        f"{config['max_tokens']} tokens per answer, {config['rounds']} alternating rounds.",
        "",
        "| placement | tokens/s | adapter loads/min | errors |",
        "|---|---:|---:|---:|",
        *(f"| {n} | {r.tokens_per_s:.1f} | {r.loads_per_min:.1f} | {r.errors} |" for n, r in runs.items()),
        "",
        f"Affinity / round-robin throughput: **{ratio:.2f}x** (target: > 1, {'met' if ratio > 1 else 'missed'}).",
    ]
    results = {"placement": {"config": config, "runs": {n: summary(r) for n, r in runs.items()}, "ratio": ratio}}
    verdict = benchmarks.Verdict(
        "adapter affinity vs round-robin (2 replicas), tokens/s", f"{ratio:.2f}x", "> 1x", ratio > 1
    )
    path = benchmarks.record(out_dir, results, "Adapter affinity vs round-robin", "\n".join(lines), now, [verdict])
    console.print(f"wrote {path} and BENCHMARKS.md")


def summary(run: Run) -> dict[str, float]:
    return {
        "tokens_per_s": round(run.tokens_per_s, 2),
        "loads_per_min": round(run.loads_per_min, 2),
        "ttft_p50_ms": round(run.ttft_p50_ms(), 1),
        "errors": run.errors,
    }


def run_merged(
    base_dir: Path, adapter_dir: Path, merged_dir: Path, out_dir: Path, console: Console, *, rounds: int = 4,
    requests: int = 24, concurrency: int = 4, max_tokens: int = 32, pool_url: str | None = None,
    merged_url: str | None = None,
) -> dict[str, Run]:  # fmt: skip
    """Merged (own vLLM, LoRA off) vs the adapter on the LoRA pool vs the base on the pool; prints and records.

    Starts the two vLLMs unless given (``pool_url`` must have a free adapter slot).
    """
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="quiver-bench-merged-") as tmp:
        work = Path(tmp)
        with console.status("Starting the LoRA pool vLLM and the merged model's vLLM"):
            pool = pool_url or ready_vllm(stack, base_dir, work, "pool", slots=1)
            merged = merged_url or ready_vllm(stack, merged_dir, work, "merged", slots=1, lora=False)
        response = httpx.post(
            f"{pool}/v1/load_lora_adapter", json={"lora_name": "adapter", "lora_path": str(adapter_dir)}, timeout=120
        )
        response.raise_for_status()
        base = httpx.get(f"{pool}/v1/models", timeout=10).json()["data"][0]["id"]
        merged_model = httpx.get(f"{merged}/v1/models", timeout=10).json()["data"][0]["id"]
        targets = {"merged": (merged, merged_model), "unmerged": (pool, "adapter"), "base": (pool, base)}
        with console.status(f"{rounds} alternating rounds of {requests} streamed requests per target"):
            runs = asyncio.run(
                compare_targets(
                    targets, rounds=rounds, requests=requests, concurrency=concurrency, max_tokens=max_tokens
                )
            )
        if pool_url is not None:  # a pool someone else uses gets its adapter slot back
            httpx.post(f"{pool}/v1/unload_lora_adapter", json={"lora_name": "adapter"}, timeout=60).raise_for_status()
    config = {"rounds": rounds, "requests_per_round": requests, "concurrency": concurrency, "max_tokens": max_tokens}
    _report_merged(runs, config, out_dir, console)
    return runs


def _report_merged(runs: dict[str, Run], config: dict[str, int], out_dir: Path, console: Console) -> None:
    base = runs["base"].tokens_per_s
    ratios = {name: (run.tokens_per_s / base if base else 0.0) for name, run in runs.items()}
    met = ratios["merged"] >= TARGET_MERGED_VS_BASE
    table = Table(title=f"Merged vs unmerged vs base, streamed (target: merged >= {TARGET_MERGED_VS_BASE}x base)")
    for column in ("served as", "tokens/s", "vs base", "TTFT p50", "errors"):
        table.add_column(column, justify="right")
    for name, run in runs.items():
        table.add_row(
            name, f"{run.tokens_per_s:.1f}", f"{ratios[name]:.2f}x", f"{run.ttft_p50_ms():.0f} ms", str(run.errors)
        )
    console.print(table)
    now = datetime.now(UTC)
    lines = [
        f"Measured on {now:%Y-%m-%d} ({os.cpu_count()} CPUs, no GPU): one rank-8 adapter served three ways, the same "
        f"streamed prompts, {config['concurrency']} in flight, {config['max_tokens']} tokens per answer, "
        f"{config['rounds']} alternating rounds. Merged: its own vLLM with LoRA off; unmerged and base: one vLLM "
        "with LoRA on (its `--max-lora-rank` the adapter's rank).",
        "",
        "| served as | tokens/s | vs base | TTFT p50 | errors |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {n} | {r.tokens_per_s:.1f} | {ratios[n]:.2f}x | {r.ttft_p50_ms():.0f} ms | {r.errors} |"
            for n, r in runs.items()
        ),
        "",
        f"Merged / base: **{ratios['merged']:.2f}x** "
        f"(target >= {TARGET_MERGED_VS_BASE}x: {'met' if met else 'missed'}).",
    ]
    results = {"merged": {"config": config, "runs": {n: summary(r) for n, r in runs.items()}, "ratios": ratios}}
    verdict = benchmarks.Verdict(
        "merged vs base, tokens/s", f"{ratios['merged']:.2f}x (unmerged {ratios['unmerged']:.2f}x)",
        f">= {TARGET_MERGED_VS_BASE}x", met,
    )  # fmt: skip
    path = benchmarks.record(out_dir, results, "Merged vs unmerged vs base", "\n".join(lines), now, [verdict])
    console.print(f"wrote {path} and BENCHMARKS.md")
