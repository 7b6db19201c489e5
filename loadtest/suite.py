"""`make bench`: every serving comparison in one run, over one shared vLLM, with a summary against targets.

One vLLM with runtime LoRA (``slots`` adapters loaded at most) serves every gateway section; a second one
serves the merged model (LoRA off) and starts beside it. Each comparison alternates its sides round by round
with the same requests, so drift on the machine hits both alike. Sections:

- the gateway against the floor (the leanest passthrough) and vLLM direct (``loadtest.bench``);
- adapter vs base and N mixed adapters vs base, through the gateway (completion tokens/s, TTFT);
- churn: many more registered adapters than slots, Zipf popularity, against the steady mixed load;
- cold start: push over HTTP -> first streamed token, over 20 adapters;
- Quiver + vLLM vs naive transformers + PEFT serving (``loadtest.naive``);
- merged vs unmerged vs base (``loadtest.routing``);
- registry scale: 10,000 versions (``loadtest.registry_scale``);
- gateway memory: RSS after warm-up vs after every gateway section.

``--gpu`` runs the same sections with a bigger model on CUDA (see ``GPU_PROFILE``).
"""

from __future__ import annotations

import asyncio
import os
import re
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from core import benchmarks
from loadtest import fixtures, routing
from loadtest.bench import Workload, start_gateway

TARGET_ADAPTER_VS_BASE = 0.8
TARGET_MIXED_VS_BASE = 0.7
TARGET_CHURN_VS_STEADY = 0.5
TARGET_COLD_START_P50_S = 2.0
TARGET_RSS_GROWTH = 0.10


@dataclass(frozen=True)
class Profile:
    """How big each section's workload is; the CPU default fits `make bench` in under 15 minutes here."""

    slots: int = 4
    rank: int = 8
    churn_adapters: int = 16
    cold_adapters: int = 20
    rounds: int = 4
    requests: int = 12
    concurrency: int = 4
    max_tokens: int = 32
    vllm_args: tuple[str, ...] = ()


# On a GPU the same sections run with more adapters in flight and longer answers.
GPU_PROFILE = Profile(slots=8, rank=16, churn_adapters=64, requests=128, concurrency=32, max_tokens=128)


@dataclass
class Serving:
    """What the gateway sections measured; the summary and the plots read it."""

    runs: dict[str, routing.Run] = field(default_factory=dict)
    cold_push_s: list[float] = field(default_factory=list)
    cold_first_token_s: list[float] = field(default_factory=list)
    rss_idle: float = 0.0
    rss_after: float = 0.0

    @property
    def cold_total_s(self) -> list[float]:
        return [p + f for p, f in zip(self.cold_push_s, self.cold_first_token_s, strict=True)]

    @property
    def rss_growth(self) -> float:
        return self.rss_after / self.rss_idle - 1 if self.rss_idle else 0.0

    def ratio(self, name: str, against: str) -> float:
        other = self.runs[against].tokens_per_s
        return self.runs[name].tokens_per_s / other if other else 0.0


def rss_bytes(gateway_url: str) -> float:
    """The gateway process's resident memory, from its own /metrics."""
    text = httpx.get(f"{gateway_url}/metrics", timeout=10).text
    found = re.search(r"^process_resident_memory_bytes ([0-9.e+]+)$", text, flags=re.MULTILINE)
    if found is None:
        raise RuntimeError(f"{gateway_url}/metrics has no process_resident_memory_bytes")
    return float(found.group(1))


def measure_serving(
    gateway: str, base_model: str, steady: Sequence[str], churn: Sequence[str], profile: Profile, console: Console
) -> dict[str, routing.Run]:
    """Base, one adapter, ``steady`` (fits the slots) round-robin and ``churn`` (does not) with Zipf popularity."""
    n = profile.requests

    def cycle(models: Sequence[str]) -> routing.Side:
        return gateway, lambda r: [models[i % len(models)] for i in range(n)]

    sides = {
        "base": cycle([base_model]),
        "adapter": cycle(steady[:1]),
        "mixed": cycle(steady),
        "churn": (gateway, lambda r: routing.zipf_sequence(churn, n, seed=r)),
    }
    with console.status(f"Serving: {profile.rounds} alternating rounds of {n} streamed requests per side"):
        return asyncio.run(
            routing.alternate(
                sides,
                rounds=profile.rounds,
                concurrency=profile.concurrency,
                max_tokens=profile.max_tokens,
                count_loads=True,
            )
        )


async def _first_token_s(client: httpx.AsyncClient, model: str) -> float:
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "stream": True}
    started = time.perf_counter()
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{model}: {response.status_code} {(await response.aread()).decode()[:200]}")
        async for line in response.aiter_lines():
            if line.startswith("data: ") and '"choices":[{' in line:
                return time.perf_counter() - started
    raise RuntimeError(f"{model}: the stream ended before its first token")


def measure_cold_start(gateway: str, adapters: Sequence[tuple[str, Path]], result: Serving, console: Console) -> None:
    """For each adapter: push it over HTTP, then time the first streamed token of its first request."""

    async def one_by_one() -> None:
        async with httpx.AsyncClient(base_url=gateway, timeout=600) as client:
            for name, directory in adapters:
                started = time.perf_counter()
                await asyncio.to_thread(fixtures.push, gateway, name, directory)
                result.cold_push_s.append(time.perf_counter() - started)
                result.cold_first_token_s.append(await _first_token_s(client, name))

    with console.status(f"Cold start: push -> first token, {len(adapters)} adapters"):
        asyncio.run(one_by_one())


def _merged(base_dir: Path, adapter: Path, work: Path) -> Path:
    """``adapter`` merged into the base through the registry's merge tool, checked equivalent."""
    from adapters import BaseModelSpec, Registry
    from adapters.merge import merge_version

    with Registry.open(
        f"sqlite:///{work / 'merge-registry.db'}", work / "merge-store", base=BaseModelSpec.from_model_dir(base_dir)
    ) as registry:
        version = registry.push_dir("bench", adapter).version
    report = merge_version(version, base_dir, work / "merged")
    if not report.equivalent:
        raise RuntimeError(f"the merged model is not equivalent to base + adapter: {report.to_json()}")
    return report.path


def _vllm(stack: ExitStack, model: Path, work: Path, name: str, profile: Profile, *, lora: bool) -> Any:
    return routing.start_vllm(
        stack, model, work, name, slots=profile.slots, rank=profile.rank, lora=lora, extra_args=profile.vllm_args
    )


SECTIONS = ("gateway", "serving", "naive", "merged")


def run(
    base_dir: Path, out_dir: Path, console: Console, *, profile: Profile, sections: Sequence[str] = SECTIONS,
    gpu: bool = False, gateway_workload: Workload = Workload(),  # noqa: B008 - frozen, so one shared default is safe
) -> Serving:  # fmt: skip
    """The vLLM-backed sections in one run; prints each table and records JSON, plots and BENCHMARKS.md.
    ``gateway_workload``: how much the gateway section (``loadtest.bench``) sends."""
    from loadtest import bench

    result = Serving()
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="quiver-bench-") as tmp:
        work = Path(tmp)
        cold_count = profile.cold_adapters if "serving" in sections else 0
        with took(console, "adapters"):
            loras = fixtures.make_adapters(base_dir, work, profile.churn_adapters + cold_count, profile.rank, console)
        churn_dirs, cold_dirs = loras[: profile.churn_adapters], loras[profile.churn_adapters :]
        pool = _vllm(stack, base_dir, work, "pool", profile, lora=True)
        # The merged model's vLLM starts beside the pool and is stopped before the other sections run.
        with ExitStack() as merged_stack:
            merged = None
            if "merged" in sections:
                with took(console, "merge"), console.status("Merging one adapter into the base (fp32, checked)"):
                    merged_dir = _merged(base_dir, churn_dirs[0], work)
                merged = _vllm(merged_stack, merged_dir, work, "merged", profile, lora=False)
            with took(console, "vLLM start"), console.status("Starting vLLM"):
                pool.wait_ready()
                if merged is not None:
                    merged.wait_ready()
            if merged is not None:
                with took(console, "merged vs unmerged vs base"):
                    routing.run_merged(
                        base_dir, churn_dirs[0], merged_dir, out_dir, console, rounds=profile.rounds,
                        requests=profile.requests, concurrency=profile.concurrency, max_tokens=profile.max_tokens,
                        pool_url=pool.url, merged_url=merged.url,
                    )  # fmt: skip
        if "gateway" in sections:  # before the suite's own gateway starts: the fewest processes beside it
            with took(console, "gateway vs the floor and vLLM direct"):
                bench.run(pool.url, churn_dirs, out_dir, console, gateway_workload)
        env = {"QUIVER_MAX_LORAS": str(profile.slots), "QUIVER_FINE_TUNING_WORKERS": "0"}
        with took(console, "gateway start"), console.status("Starting the gateway"):
            gateway = start_gateway(stack, pool.url, work, "suite", env)
        names = [f"bench-{i}" for i in range(len(churn_dirs))]
        with console.status(f"Pushing {len(names)} adapters over HTTP"):
            for name, directory in zip(names, churn_dirs, strict=True):
                fixtures.push(gateway, name, directory)
        base_model, steady = pool.served_name, names[: profile.slots]
        asyncio.run(routing.drive(gateway, [base_model, *steady], 1, 4, routing.Run()))
        result.rss_idle = rss_bytes(gateway)

        if "serving" in sections:
            with took(console, "adapters vs base, churn, cold start"):
                result.runs = measure_serving(gateway, base_model, steady, names, profile, console)
                measure_cold_start(gateway, [(f"cold-{i}", d) for i, d in enumerate(cold_dirs)], result, console)
        if "naive" in sections:
            from loadtest import naive

            with took(console, "naive"):
                naive.run(base_dir, dict(zip(steady, churn_dirs, strict=False)), gateway, work, out_dir, console)
        result.rss_after = rss_bytes(gateway)
    if "serving" in sections:
        report(result, profile, out_dir, console, gpu=gpu)
    return result


@contextmanager
def took(console: Console, what: str) -> Iterator[None]:
    """Print how long ``what`` took: the suite's time budget is spent in plain sight."""
    started = time.perf_counter()
    yield
    console.print(f"[dim]{what}: {time.perf_counter() - started:.0f} s[/]")


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def serving_verdicts(result: Serving) -> list[benchmarks.Verdict]:
    """Adapter and mixed against base, churn against the steady mix, cold start, gateway memory."""
    Verdict = benchmarks.Verdict

    def at_least(comparison: str, ratio: float, target: float) -> benchmarks.Verdict:
        return Verdict(comparison, f"{ratio:.2f}x", f">= {target}x", ratio >= target)

    churn, failures = result.ratio("churn", "mixed"), result.runs["churn"].errors
    cold = statistics.median(result.cold_total_s) if result.cold_total_s else 0.0
    return [
        at_least("adapter vs base, tokens/s", result.ratio("adapter", "base"), TARGET_ADAPTER_VS_BASE),
        at_least("N mixed adapters vs base, tokens/s", result.ratio("mixed", "base"), TARGET_MIXED_VS_BASE),
        Verdict(
            "churn (Zipf, adapters >> slots) vs steady, tokens/s",
            f"{churn:.2f}x, {failures} failures",
            f">= {TARGET_CHURN_VS_STEADY}x, 0 failures",
            churn >= TARGET_CHURN_VS_STEADY and failures == 0,
        ),
        Verdict(
            "cold start: push -> first token, p50",
            f"{cold:.2f} s",
            f"< {TARGET_COLD_START_P50_S} s",
            cold < TARGET_COLD_START_P50_S,
        ),
        Verdict(
            "gateway RSS growth over the run",
            f"{100 * result.rss_growth:+.1f}%",
            f"< {100 * TARGET_RSS_GROWTH:.0f}%",
            result.rss_growth < TARGET_RSS_GROWTH,
        ),
    ]


def report(result: Serving, profile: Profile, out_dir: Path, console: Console, *, gpu: bool) -> None:
    """Print the serving sections and record them (JSON, plots, BENCHMARKS.md with the summary)."""
    from loadtest import plots

    now = datetime.now(UTC)
    where = f"{os.cpu_count()} CPUs, {'CUDA' if gpu else 'no GPU'}"
    runs, base = result.runs, result.runs["base"].tokens_per_s
    table = Table(title="Through the gateway: base, one adapter, N mixed, churn (streamed, alternating rounds)")
    for column in ("side", "tokens/s", "vs base", "TTFT p50", "adapter loads/min", "errors"):
        table.add_column(column, justify="right")
    rows = []
    for name, run in runs.items():
        cells = (f"{run.tokens_per_s:.1f}", f"{run.tokens_per_s / base if base else 0:.2f}x",
                 f"{run.ttft_p50_ms():.0f} ms", f"{run.loads_per_min:.1f}", str(run.errors))  # fmt: skip
        table.add_row(name, *cells)
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    console.print(table)
    stamp = f"{now:%Y-%m-%d}"
    plot = plots.bars(
        out_dir / f"{stamp}-serving.png",
        "Completion tokens/s through the gateway",
        {"tokens/s": {n: r.tokens_per_s for n, r in runs.items()}},
        "tokens/s",
    )
    verdicts = serving_verdicts(result)
    config = {k: v for k, v in profile.__dict__.items() if k != "vllm_args"}
    lines = [
        f"Measured on {stamp} ({where}): {profile.rounds} alternating rounds of {profile.requests} streamed chat "
        f"requests per side, {profile.concurrency} in flight, {profile.max_tokens} tokens per answer (`ignore_eos`), "
        f"one vLLM with {profile.slots} adapter slots (`--max-lora-rank {profile.rank}`), rank-{profile.rank} "
        f"adapters. `mixed`: {profile.slots} adapters in turn (all fit the slots); `churn`: "
        f"{profile.churn_adapters} adapters with Zipf popularity (s=1.1), so the gateway swaps adapters in and out.",
        "",
        "| side | tokens/s | vs base | TTFT p50 | adapter loads/min | errors |",
        "|---|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"![tokens/s]({plot.relative_to(out_dir.parent.parent)})",
    ]
    results = {"serving": {"config": config, "runs": {n: routing.summary(r) for n, r in runs.items()}}}
    benchmarks.record(out_dir, results, "Adapters vs base, mixed and churn", "\n".join(lines), now, verdicts[:3])

    total, push, first = result.cold_total_s, result.cold_push_s, result.cold_first_token_s
    cold_rows = [(label, values) for label, values in (("push (upload, validate, store)", push),
                 ("first token after push (load + prefill)", first), ("push -> first token", total))]  # fmt: skip
    plot = plots.lines(
        out_dir / f"{stamp}-cold-start.png",
        "Cold start per adapter",
        {label: list(enumerate(values)) for label, values in cold_rows},
        "adapter (in push order)",
        "seconds",
    )
    lines = [
        f"Measured on {stamp} ({where}): {len(total)} new rank-{profile.rank} adapters, one at a time: pushed over "
        f"HTTP (`POST /v1/adapters`), then one streamed request each, `max_tokens=1`, while {profile.slots} "
        "slots are full (every load evicts one).",
        "",
        "| step | p50 | p90 | max |",
        "|---|---:|---:|---:|",
        *(f"| {label} | {_pct(v, 0.5):.2f} s | {_pct(v, 0.9):.2f} s | {max(v):.2f} s |" for label, v in cold_rows),
        "",
        f"![cold start]({plot.relative_to(out_dir.parent.parent)})",
    ]
    cold = {"push_s": push, "first_token_s": first, "p50_s": round(_pct(total, 0.5), 3)}
    benchmarks.record(out_dir, {"cold_start": cold}, "Cold start", "\n".join(lines), now, verdicts[3:4])

    memory = {"rss_idle_mb": round(result.rss_idle / 2**20, 1), "rss_after_mb": round(result.rss_after / 2**20, 1),
              "growth": round(result.rss_growth, 4)}  # fmt: skip
    lines = [
        f"Measured on {stamp} ({where}): the gateway's resident memory (its own `/metrics`) after start-up, "
        "the adapter pushes and one warm-up request each, and again after the serving, churn, cold-start and "
        "naive-comparison sections went through it.",
        "",
        "| idle | after the run | growth |",
        "|---:|---:|---:|",
        f"| {memory['rss_idle_mb']} MiB | {memory['rss_after_mb']} MiB | {100 * result.rss_growth:+.1f}% |",
    ]
    benchmarks.record(out_dir, {"gateway_memory": memory}, "Gateway memory", "\n".join(lines), now, verdicts[4:])
    console.print(f"wrote {out_dir} and BENCHMARKS.md")
