"""Registry scale: 10,000 versions registered, then how fast the gateway answers over them.

The registry is filled through ``Registry.push_dir``, the registry's own push path (staging, validation
against the base, content hash, sealed store directory, version row), with one real PEFT adapter as the
template: a LoRA on one layer, so 10,000 copies stay small on disk, and new weights drawn for every
version, so each version has content of its own. A gateway started on that registry, in front of the
instant upstream (no model, answers at once), is then timed one request at a time. Before that, its cold start:
from starting a gateway process on that registry to its first 200 on ``GET /v1/models``, a few times over.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from adapters import BaseModelSpec, Catalog, Registry
from core import benchmarks, processes
from loadtest.bench import MESSAGES, Sample, gateway_command, start_gateway

TARGET_P50_MS = 20.0
TARGET_COLD_START_S = 1.5
HEADING = "Registry scale"
ALIAS = "staging"
# A LoRA on one projection of one layer: real (PEFT saves it, the registry validates it), about 40 kB.
TARGET_MODULE = "model.layers.0.self_attn.q_proj"
WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class Layout:
    """How many adapters and versions of each; ``adapter(i)`` names them."""

    adapters: int = 100
    versions: int = 100

    @property
    def total(self) -> int:
        return self.adapters * self.versions

    @staticmethod
    def adapter(i: int) -> str:
        return f"scale-{i:04d}"

    def models(self, rng: random.Random, n: int, *, alias: bool = False) -> list[str]:
        """``n`` model strings over every adapter: ``name@vN`` with N at random, or ``name@staging``."""
        picks = [(rng.randrange(self.adapters), rng.randrange(self.versions) + 1) for _ in range(n)]
        return [f"{self.adapter(a)}@{ALIAS if alias else f'v{v}'}" for a, v in picks]


@dataclass
class Latency:
    """One thing timed, one request at a time."""

    what: str
    requests: int
    p50_ms: float
    p99_ms: float
    errors: int

    @property
    def met(self) -> bool:
        return self.p50_ms < TARGET_P50_MS and self.errors == 0


@dataclass
class Result:
    """What the section measured: registering, the snapshot the gateway reads, and each latency."""

    adapters: int
    versions_per_adapter: int
    workers: int
    register_s: float
    snapshot_s: float
    latencies: list[Latency]
    cold_start_s: list[float] = field(default_factory=list)  # process start -> first 200 on /v1/models, each start

    @property
    def versions(self) -> int:
        return self.adapters * self.versions_per_adapter

    @property
    def versions_per_s(self) -> float:
        return self.versions / self.register_s if self.register_s else 0.0


# -- filling the registry ------------------------------------------------------------------------


def open_registry(registry_dir: Path, base_dir: Path) -> Registry:
    """The registry in ``registry_dir``, checking pushes against the base model."""
    spec = BaseModelSpec.from_model_dir(base_dir)
    return Registry.open(database_url(registry_dir), store_dir(registry_dir), base=spec)


def database_url(registry_dir: Path) -> str:
    """The SQLite registry inside ``registry_dir``."""
    return f"sqlite:///{registry_dir / 'registry.db'}"


def store_dir(registry_dir: Path) -> Path:
    """The adapter store inside ``registry_dir``."""
    return registry_dir / "store"


def make_template(base_dir: Path, out_dir: Path) -> Path:
    """One real PEFT LoRA adapter of the base, on a single layer."""
    from training.synthetic import random_lora

    return random_lora(base_dir, out_dir, rank=8, target_modules=(TARGET_MODULE,), seed=0)


def push_versions(
    registry_dir: Path, base_dir: Path, template: Path, scratch: Path, adapters: Sequence[int], versions: int
) -> tuple[int, float, float]:
    """Push ``versions`` versions of each adapter numbered in ``adapters``, new weights every time.

    Returns how many, and the wall-clock time (``time.time``) of the first push's start and the last one's end.
    """
    import torch
    from safetensors.torch import load_file, save_file

    shapes = {key: tensor.shape for key, tensor in load_file(template / WEIGHTS).items()}
    scratch.mkdir(parents=True, exist_ok=True)
    for path in template.iterdir():
        if path.name != WEIGHTS:
            (scratch / path.name).write_bytes(path.read_bytes())
    registry = open_registry(registry_dir, base_dir)
    pushed, started = 0, time.time()
    try:
        for a in adapters:
            for v in range(versions):
                generator = torch.Generator().manual_seed(a * versions + v)
                weights = {key: torch.randn(shape, generator=generator) * 0.05 for key, shape in shapes.items()}
                save_file(weights, str(scratch / WEIGHTS), metadata={"format": "pt"})
                registry.push_dir(Layout.adapter(a), scratch)
                pushed += 1
    finally:
        registry.close()
    return pushed, started, time.time()


def build(registry_dir: Path, base_dir: Path, work: Path, layout: Layout, workers: int) -> float:
    """Fill a new registry with ``layout``, ``workers`` processes pushing disjoint adapters; the seconds the pushes
    took, from the first one's start to the last one's end. Every adapter then gets ``staging`` on a middle version.
    """
    template = make_template(base_dir, work / "template")
    with open_registry(registry_dir, base_dir) as registry:  # the tables exist before the workers open them
        # spawn, not fork: the parent runs threads (a console spinner, torch) that a fork would copy mid-step.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [
                pool.submit(
                    push_versions,
                    registry_dir,
                    base_dir,
                    template,
                    work / f"scratch-{w}",
                    range(w, layout.adapters, workers),
                    layout.versions,
                )
                for w in range(workers)
            ]
            spans = [f.result() for f in futures]
        for a in range(layout.adapters):
            registry.set_alias(Layout.adapter(a), ALIAS, (layout.versions + 1) // 2)
    pushed = sum(n for n, _, _ in spans)
    if pushed != layout.total:
        raise RuntimeError(f"pushed {pushed} versions, expected {layout.total}")
    return max(end for _, _, end in spans) - min(start for _, start, _ in spans)


# -- timing --------------------------------------------------------------------------------------


def time_each(call: Callable[[str], bool], items: Sequence[str]) -> Sample:
    """Call ``call`` on each item in turn; the latencies of those that succeeded, and the failures."""
    sample = Sample([], 0.0, 0)
    for item in items:
        started = time.perf_counter()
        ok = call(item)
        elapsed = time.perf_counter() - started
        sample.wall_s += elapsed
        if ok:
            sample.latencies.append(elapsed)
        else:
            sample.errors += 1
    return sample


def latency(what: str, sample: Sample) -> Latency:
    """A sample as a row (milliseconds)."""
    found = bool(sample.latencies)
    return Latency(
        what=what,
        requests=len(sample.latencies) + sample.errors,
        p50_ms=round(sample.pct(0.5), 3) if found else 0.0,
        p99_ms=round(sample.pct(0.99), 3) if found else 0.0,
        errors=sample.errors,
    )


def measure_gateway(gateway_url: str, layout: Layout, requests: int, seed: int = 0) -> list[Latency]:
    """``/v1/models``, one model card, and chat completions naming versions and aliases, one at a time."""
    rng = random.Random(seed)
    versions, aliases = layout.models(rng, requests), layout.models(rng, requests, alias=True)
    with httpx.Client(base_url=gateway_url, timeout=60) as client:

        def models(_: str) -> bool:
            return client.get("/v1/models").status_code == 200

        def card(model: str) -> bool:
            response = client.get(f"/v1/models/{model}")
            return response.status_code == 200 and response.json()["id"] == model

        def chat(model: str) -> bool:
            body = {"model": model, "messages": MESSAGES, "max_tokens": 1}
            return client.post("/v1/chat/completions", json=body).status_code == 200

        for warm in (models, card, chat):  # connections, and the first request's lazy set-up
            warm(versions[0])
        listed = len(client.get("/v1/models").json()["data"])
        if listed <= layout.total:
            raise RuntimeError(f"the gateway lists {listed} models, fewer than the {layout.total} versions registered")
        hot = [aliases[0]] * requests
        return [
            latency(f"GET /v1/models ({layout.total:,} versions listed)", time_each(models, [""] * (requests // 4))),
            latency("GET /v1/models/{name@vN}", time_each(card, versions)),
            latency("chat completion, name@vN at random (each loads its adapter)", time_each(chat, versions)),
            latency(f"chat completion, name@{ALIAS} at random (each loads its adapter)", time_each(chat, aliases)),
            latency(f"chat completion, one name@{ALIAS} (resident)", time_each(chat, hot)),
        ]


def cold_start(upstream: str, work: Path, env: dict[str, str], starts: int) -> list[float]:
    """Seconds from starting a gateway process to its first 200 on ``GET /v1/models``, ``starts`` times in turn."""
    took: list[float] = []
    with httpx.Client(timeout=5) as client:

        def answers(url: str) -> bool:
            try:
                return client.get(url).status_code == 200
            except httpx.TransportError:
                return False

        for i in range(starts):
            port = processes.free_port()
            url = f"http://127.0.0.1:{port}/v1/models"
            started = time.perf_counter()
            gateway = processes.start("the gateway", gateway_command(upstream, port), work / f"cold-{i}.log", env=env)
            try:
                gateway.wait_ready(partial(answers, url), 300, condition=f"GET {url} answering 200", interval_s=0.01)
                took.append(time.perf_counter() - started)
            finally:
                gateway.stop()
    return took


def measure_registry(registry: Registry, layout: Layout, requests: int, seed: int = 1) -> tuple[list[Latency], float]:
    """``Registry.resolve`` in-process for versions and aliases, and the seconds a full snapshot takes."""
    rng = random.Random(seed)
    versions, aliases = layout.models(rng, requests), layout.models(rng, requests, alias=True)

    def resolve(model: str) -> bool:
        return registry.resolve(model).name == Catalog.adapter_name(model)

    rows = [
        latency("Registry.resolve(name@vN), in-process", time_each(resolve, versions)),
        latency(f"Registry.resolve(name@{ALIAS}), in-process", time_each(resolve, aliases)),
    ]
    snapshot = time_each(lambda _: len(registry.snapshot().model_ids()) > layout.total, ["", "", ""])
    return rows, snapshot.pct(0.5) / 1000


def run(
    base_dir: Path, out_dir: Path, console: Console, *, layout: Layout = Layout(), requests: int = 200,
    workers: int | None = None, cold_starts: int = 3,
) -> Result:  # fmt: skip
    """Fill a registry with ``layout``, time the gateway's cold start (``cold_starts`` times) and the gateway and the
    registry over it; prints and records."""
    from loadtest.instant_upstream import start as start_instant

    workers = workers or os.cpu_count() or 1
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="quiver-bench-registry-") as tmp:
        work = Path(tmp)
        registry_dir = work / "registry"
        with console.status(f"Registering {layout.total:,} versions ({layout.adapters} adapters, {workers} processes)"):
            register_s = build(registry_dir, base_dir, work, layout, workers)
        env = {"QUIVER_DATABASE_URL": database_url(registry_dir), "QUIVER_STORE_DIR": str(store_dir(registry_dir)),
               "QUIVER_FINE_TUNING_WORKERS": "0"}  # fmt: skip
        instant = start_instant(stack, work)
        with console.status(f"Cold start over {layout.total:,} versions: {cold_starts} gateway starts"):
            cold = cold_start(instant, work, env | {"QUIVER_DATA_DIR": str(work / "data-cold")}, cold_starts)
        with console.status("Starting a gateway on the registry"):
            gateway = start_gateway(stack, instant, work, "registry-scale", env)
        with console.status(f"Timing the gateway over {layout.total:,} versions"):
            rows = measure_gateway(gateway, layout, requests)
        with console.status("Timing Registry.resolve in-process"), open_registry(registry_dir, base_dir) as registry:
            resolved, snapshot_s = measure_registry(registry, layout, requests)
    result = Result(
        adapters=layout.adapters,
        versions_per_adapter=layout.versions,
        workers=workers,
        register_s=round(register_s, 2),
        snapshot_s=round(snapshot_s, 3),
        latencies=rows + resolved,
        cold_start_s=[round(t, 3) for t in cold],
    )
    report(result, out_dir, console)
    return result


# -- reporting -----------------------------------------------------------------------------------


def verdicts(result: Result) -> list[benchmarks.Verdict]:
    """One line for the summary: the slowest p50 of everything timed; met when every one is under the target."""
    slowest = max(result.latencies, key=lambda r: r.p50_ms)
    errors = sum(r.errors for r in result.latencies)
    found = [
        benchmarks.Verdict(
            f"registry scale, {result.versions:,} versions: /v1/models, a model card, resolve in a request and "
            "in-process, slowest p50",
            f"{slowest.p50_ms:.2f} ms ({slowest.what}){f', {errors} errors' if errors else ''}",
            f"< {TARGET_P50_MS:g} ms each",
            all(r.met for r in result.latencies),
        )
    ]
    if result.cold_start_s:
        cold = statistics.median(result.cold_start_s)
        found.append(
            benchmarks.Verdict(
                f"gateway cold start with {result.versions:,} versions: process start -> first 200 on /v1/models, "
                f"median of {len(result.cold_start_s)}",
                f"{cold:.2f} s (each: {', '.join(f'{t:.2f}' for t in result.cold_start_s)})",
                f"<= {TARGET_COLD_START_S:g} s",
                cold <= TARGET_COLD_START_S,
            )
        )
    return found


def markdown(result: Result, now: datetime) -> str:
    """The section's body for BENCHMARKS.md."""
    lines = [
        f"Measured on {now:%Y-%m-%d} ({os.cpu_count()} CPUs): {result.versions:,} versions ({result.adapters} "
        f"adapters x {result.versions_per_adapter} versions, each a real rank-8 PEFT LoRA on one layer with weights "
        f"of its own) pushed through `Registry.push_dir` by {result.workers} processes in **{result.register_s:.0f} s "
        f"({result.versions_per_s:.0f} versions/s)**; every adapter has the alias `{ALIAS}`. A gateway on that "
        "SQLite registry, in front of an upstream that answers at once, timed one request at a time. A full "
        f"registry snapshot (what the gateway reads after each change) takes {result.snapshot_s:.2f} s.",
        "",
        "| timed | requests | p50 | p99 | errors | target p50 |",
        "|---|---:|---:|---:|---:|---|",
        *(
            f"| {r.what} | {r.requests} | {r.p50_ms:.2f} ms | {r.p99_ms:.2f} ms | {r.errors} | "
            f"{'met' if r.met else '**missed**'} (< {TARGET_P50_MS:g} ms) |"
            for r in result.latencies
        ),
    ]
    if result.cold_start_s:
        cold = statistics.median(result.cold_start_s)
        lines += [
            "",
            f"Cold start: from starting a gateway process (`quiver up --vllm-url`, no fine-tuning workers) on that "
            f"registry to its first 200 on `GET /v1/models`, {len(result.cold_start_s)} starts one after another: "
            f"median **{cold:.2f} s** (each: {', '.join(f'{t:.2f} s' for t in result.cold_start_s)}; target <= "
            f"{TARGET_COLD_START_S:g} s: {'met' if cold <= TARGET_COLD_START_S else '**missed**'}).",
        ]
    return "\n".join(lines) + "\n"


def report(result: Result, out_dir: Path, console: Console) -> Path:
    """Print the table and record the section (JSON, BENCHMARKS.md, the summary's verdicts)."""
    table = Table(title=f"Registry scale: {result.versions:,} versions (target: p50 < {TARGET_P50_MS:g} ms)")
    for column in ("timed", "p50", "p99", "errors", "target"):
        table.add_column(column, justify="right")
    for r in result.latencies:
        table.add_row(r.what, f"{r.p50_ms:.2f} ms", f"{r.p99_ms:.2f} ms", str(r.errors),
                      "[green]met[/]" if r.met else "[red]missed[/]")  # fmt: skip
    console.print(table)
    if result.cold_start_s:
        console.print(f"cold start (process start -> first 200 on /v1/models): "
                      f"{', '.join(f'{t:.2f} s' for t in result.cold_start_s)}")  # fmt: skip
    console.print(f"registered {result.versions:,} versions in {result.register_s:.1f} s "
                  f"({result.versions_per_s:.0f}/s); snapshot {result.snapshot_s:.2f} s")  # fmt: skip
    now = datetime.now(UTC)
    results = {"registry_scale": {**asdict(result), "versions_per_s": round(result.versions_per_s, 1)}}
    path = benchmarks.record(out_dir, results, HEADING, markdown(result, now), now, verdicts(result))
    console.print(f"wrote {path} and BENCHMARKS.md")
    return path


if __name__ == "__main__":
    import argparse

    from core import embedded

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=Layout.adapters)
    parser.add_argument("--versions", type=int, default=Layout.versions)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--cold-starts", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    console = Console()
    run(embedded.prepare(console=console), args.out, console, layout=Layout(args.adapters, args.versions),
        requests=args.requests, workers=args.workers, cold_starts=args.cold_starts)  # fmt: skip
