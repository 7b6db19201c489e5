"""``quiver bench``: every serving comparison side by side in one run (``loadtest/suite.py`` and the sections it
names), plus the training and placement comparisons when asked."""

from __future__ import annotations

from dataclasses import replace
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from core.errors import InvalidRequest
from quiver.context import console, err, fail, needs

if TYPE_CHECKING:
    from loadtest.bench import Workload


class Benchmark(StrEnum):
    """The sections of `quiver bench`, each of which `--only` runs alone."""

    gateway = "gateway"
    serving = "serving"
    naive = "naive"
    merged = "merged"
    registry = "registry"
    training = "training"
    routing = "routing"
    embeddings = "embeddings"


def bench(
    only: Annotated[list[Benchmark] | None, typer.Option(help="Run these sections only (repeatable).")] = None,
    out: Annotated[Path, typer.Option(help="Results directory.")] = Path("bench/results"),
    gpu: Annotated[bool, typer.Option(help="Run on CUDA with --base-model and a bigger workload.")] = False,
    base_model: Annotated[
        Path | None, typer.Option(help="Base model directory (default: the embedded model; required with --gpu).")
    ] = None,
    vllm_url: Annotated[
        str | None, typer.Option(help="--only gateway: benchmark against this vLLM instead of starting one.")
    ] = None,
    gateway_rounds: Annotated[int, typer.Option(min=1, help="Alternating rounds of the gateway section.")] = 6,
    gateway_scale: Annotated[
        float, typer.Option(min=0.01, help="The gateway section's requests per round, times this (a short trial: 0.1).")
    ] = 1.0,
    training_steps: Annotated[int, typer.Option(help="Timed optimizer steps per training run.")] = 3,
    training_rounds: Annotated[int, typer.Option(help="Alternating rounds of the training comparison.")] = 2,
) -> None:
    """Every serving comparison side by side in one run: the gateway vs the floor and vLLM direct, adapters vs
    base, churn, cold start, naive transformers + PEFT, merged vs unmerged, registry scale and the gateway's cold
    start, gateway memory. `--only training`, `--only routing` (affinity vs round-robin over two replicas) and
    `--only embeddings` (the ONNX embedder vs sentence-transformers) add those comparisons."""
    needs("quiver bench", "ml", "training", "bench", "vllm")
    from core import embedded
    from core.vllm_server import has_cuda
    from loadtest import suite
    from loadtest.bench import Workload

    # The default run is the serving suite (under 15 minutes on a 2-core CPU); training and placement start
    # processes of their own and run when named.
    chosen = set(only or set(Benchmark) - {Benchmark.training, Benchmark.routing, Benchmark.embeddings})
    if vllm_url is not None and chosen != {Benchmark.gateway}:
        fail(InvalidRequest("--vllm-url goes with --only gateway (the other sections start their own vLLM)"))
    if gpu and base_model is None:
        fail(InvalidRequest("--gpu needs --base-model: a model directory to serve on CUDA", param="base_model"))
    if gpu and not has_cuda():
        fail(InvalidRequest("--gpu: CUDA is not available on this machine", param="gpu"))
    base = base_model or embedded.prepare(console=err)
    profile = suite.GPU_PROFILE if gpu else suite.Profile()
    workload = replace(Workload(), rounds=gateway_rounds).scaled(gateway_scale)
    if chosen == {Benchmark.gateway} and vllm_url is not None:
        _bench_gateway(base, vllm_url, out, workload)
    elif served := [s for s in suite.SECTIONS if s in chosen]:
        suite.run(base, out, console, profile=profile, sections=served, gpu=gpu, gateway_workload=workload)
    if Benchmark.registry in chosen:
        from loadtest import registry_scale

        with suite.took(console, "registry scale"):
            registry_scale.run(base, out, console)
    if Benchmark.training in chosen:
        from training import bench as training_bench

        with suite.took(console, "training"):
            training_bench.run(base, out, console, steps=training_steps, rounds=training_rounds)
    if Benchmark.routing in chosen:
        with suite.took(console, "affinity vs round-robin"):
            _bench_placement(base, out, profile)
    if Benchmark.embeddings in chosen:
        from loadtest import embeddings

        with suite.took(console, "embeddings"):
            embeddings.run(out, console)


def _bench_gateway(base: Path, vllm_url: str, out: Path, workload: Workload) -> None:
    import tempfile

    from loadtest import bench, fixtures

    # Rank 8: they fit the LoRA slots of a vLLM started with any --max-lora-rank from 8 up.
    with tempfile.TemporaryDirectory(prefix="quiver-bench-adapters-") as tmp:
        adapters = fixtures.make_adapters(base, Path(tmp), workload.adapters, 8, err)
        bench.run(vllm_url, adapters, out, console, workload)


def _bench_placement(base: Path, out: Path, profile: Any) -> None:
    import tempfile

    from loadtest import fixtures, routing

    with tempfile.TemporaryDirectory(prefix="quiver-bench-adapters-") as tmp:
        adapters = fixtures.make_adapters(base, Path(tmp), 6, profile.rank, err)
        routing.run_placement(base, adapters, out, console)
