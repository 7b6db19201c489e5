"""``quiver loadtest``: one locust scenario against a target, with the target's memory and counters sampled beside it.

Locust runs in a process of its own: gevent monkey-patches the standard library of whatever process
imports it. Its CSV files and HTML report go to the output directory; the summary table is read back
from its stats CSV. Meanwhile the target's ``/metrics`` is scraped every few seconds for the gateway's
resident memory (``process_resident_memory_bytes``) and its request and error counters, into
``samples.csv``: a long run (``--duration 10m``) is the soak test.
"""

from __future__ import annotations

import csv
import re
import signal
import sys
import time
import urllib.error
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from core import processes
from core.errors import InvalidRequest, Unavailable
from core.processes import ChildProcess, free_port
from loadtest.scenarios import SCENARIOS, Offer, Options, fetch_offer

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
CSV_PREFIX = "locust"
HTML_REPORT = "report.html"
SAMPLES = "samples.csv"
SAMPLES_PLOT = "samples.png"
LOCUST_LOG = "locust.log"
# How long locust lets users finish the request they are in when the time is up.
STOP_TIMEOUT_S = 30
# Rows of the over-time table printed under the summary (the full series is in samples.csv).
TIMELINE_ROWS = 8
_DURATION = re.compile(r"(?:(?P<h>\d+)h)?(?:(?P<m>\d+)m)?(?:(?P<s>\d+)s)?")
_CATCH_RESPONSE = re.compile(r"CatchResponseError\((?P<q>['\"])(?P<text>.*)(?P=q)\)", re.DOTALL)
MIB = 1024 * 1024


@dataclass(frozen=True)
class LoadTest:
    """One `quiver loadtest` run."""

    scenario: str
    host: str
    users: int
    spawn_rate: float
    duration_s: int
    out: Path
    web: bool = False
    options: Options = field(default_factory=Options)
    sample_every_s: float = 5.0

    def locust_command(self, web_port: int | None) -> list[str]:
        """The locust command line; headless unless ``web_port`` is given."""
        command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--host", self.host]
        command += ["-u", str(self.users), "-r", str(self.spawn_rate), "-s", str(STOP_TIMEOUT_S)]
        command += ["--csv", str(self.out / CSV_PREFIX), "--html", str(self.out / HTML_REPORT)]
        if web_port is None:
            command += ["--headless", "--only-summary", "-t", f"{self.duration_s}s"]
        else:
            command += ["--web-host", "127.0.0.1", "--web-port", str(web_port)]
        return command + list(SCENARIOS[self.scenario])


def parse_duration(text: str) -> int:
    """Seconds in a duration like ``90``, ``45s``, ``10m`` or ``1h30m``; InvalidRequest otherwise."""
    text = text.strip()
    match = _DURATION.fullmatch(text)
    if text.isdigit():
        seconds = int(text)
    elif match is not None and any(match.groups()):
        seconds = 3600 * int(match["h"] or 0) + 60 * int(match["m"] or 0) + int(match["s"] or 0)
    else:
        raise InvalidRequest(f"duration {text!r} does not parse: use seconds (90) or 45s, 10m, 1h30m")
    if seconds <= 0:
        raise InvalidRequest(f"duration {text!r} is not positive")
    return seconds


@dataclass(frozen=True)
class StatRow:
    """One line of locust's stats CSV: a request name (or ``Aggregated``) and its numbers; times in ms."""

    kind: str
    name: str
    requests: int
    failures: int
    p50: float | None
    p95: float | None
    p99: float | None
    rps: float


def read_stats(path: Path) -> list[StatRow]:
    """The rows of a ``*_stats.csv``, the ``Aggregated`` one last."""
    with path.open(newline="", encoding="utf-8") as f:
        return [
            StatRow(
                kind=row["Type"],
                name=row["Name"],
                requests=int(row["Request Count"]),
                failures=int(row["Failure Count"]),
                p50=_ms(row["50%"]),
                p95=_ms(row["95%"]),
                p99=_ms(row["99%"]),
                rps=float(row["Requests/s"]),
            )
            for row in csv.DictReader(f)
        ]


def _ms(value: str) -> float | None:
    return None if value in ("", "N/A") else float(value)


def read_failures(path: Path) -> list[tuple[str, str, int]]:
    """(name, error, occurrences) from a ``*_failures.csv``, most frequent first."""
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        rows = [(r["Name"], _unwrap(r["Error"]), int(r["Occurrences"])) for r in csv.DictReader(f)]
    return sorted(rows, key=lambda r: -r[2])


def _unwrap(error: str) -> str:
    """The failure text the locustfile gave, without the exception locust wraps it in."""
    found = _CATCH_RESPONSE.fullmatch(error)
    return found["text"] if found else error


@dataclass(frozen=True)
class Sample:
    """The target's state at one moment: resident memory and cumulative requests and failed requests."""

    elapsed_s: float
    rss_bytes: float | None
    requests: float | None
    failures: float | None


def read_metrics(text: str) -> tuple[float | None, float | None, float | None]:
    """RSS bytes, requests and failed (non-2xx) requests from a Prometheus exposition; None for what is absent."""
    rss = requests = failures = None
    for family in text_string_to_metric_families(text):
        if family.name == "process_resident_memory_bytes" and family.samples:
            rss = family.samples[0].value
        elif family.name == "quiver_requests":
            totals = [s for s in family.samples if s.name == "quiver_requests_total"]
            requests = sum(s.value for s in totals)
            failures = sum(s.value for s in totals if not s.labels.get("status", "").startswith("2"))
    return rss, requests, failures


class Sampler:
    """Scrapes ``{host}/metrics`` on demand and appends each sample to ``samples.csv`` as it is taken."""

    def __init__(self, host: str, path: Path) -> None:
        self.host = host
        self.samples: list[Sample] = []
        self._started = time.monotonic()
        self._file = path.open("w", newline="", encoding="utf-8")
        self._csv = csv.writer(self._file)
        self._csv.writerow(["time", "elapsed_s", "rss_bytes", "requests", "failures"])
        self._client = httpx.Client(timeout=5)

    def take(self) -> Sample:
        """One sample now; a target that does not answer gives an empty one."""
        try:
            values = read_metrics(self._client.get(f"{self.host}/metrics").text)
        except (httpx.HTTPError, ValueError):
            values = (None, None, None)
        sample = Sample(round(time.monotonic() - self._started, 1), *values)
        self.samples.append(sample)
        counts = ("" if v is None else f"{v:.0f}" for v in values)
        self._csv.writerow([datetime.now(UTC).isoformat(timespec="seconds"), sample.elapsed_s, *counts])
        self._file.flush()
        return sample

    def close(self) -> None:
        self._client.close()
        self._file.close()


@dataclass(frozen=True)
class Growth:
    """What the samples say about the run: RSS at start, end and max, and the target's own counts."""

    rss_start: float
    rss_end: float
    rss_max: float
    requests: float | None
    failures: float | None

    @property
    def percent(self) -> float:
        return 100 * (self.rss_end - self.rss_start) / self.rss_start if self.rss_start else 0.0

    @classmethod
    def of(cls, samples: Sequence[Sample]) -> Growth | None:
        """None when the target never reported its RSS."""
        rss = [s.rss_bytes for s in samples if s.rss_bytes is not None]
        if not rss:
            return None
        counted = [(s.requests, s.failures or 0.0) for s in samples if s.requests is not None]
        if not counted:
            return cls(rss[0], rss[-1], max(rss), None, None)
        (first, first_failed), (last, last_failed) = counted[0], counted[-1]
        return cls(rss[0], rss[-1], max(rss), last - first, last_failed - first_failed)


def run(test: LoadTest, console: Console, err: Console) -> int:
    """Check the target offers the scenario, run locust, print the summary; the exit code (0: no failure)."""
    offer = check_target(test)
    for note in offer.notes(test.scenario, test.options):
        err.print(note, highlight=False)
    test.out.mkdir(parents=True, exist_ok=True)
    web_port = free_port() if test.web else None
    sampler = Sampler(test.host, test.out / SAMPLES)
    with _interruptible():
        sampler.take()
        command = test.locust_command(web_port)
        locust = processes.start("locust", command, test.out / LOCUST_LOG, env=test.options.to_env(), append=False)
        try:
            if web_port is not None:
                console.print(f"locust's web UI: http://127.0.0.1:{web_port} (Ctrl-C ends the run)")
            code = _watch(locust, test, sampler, err)
        finally:
            locust.stop(steps=())  # it has exited, or _watch failed: kill it (and anything it left)
            sampler.take()
            sampler.close()
    return report(test, code, sampler.samples, console, err)


def check_target(test: LoadTest) -> Offer:
    """What the target offers; Unavailable when it cannot be reached, InvalidRequest when it lacks the scenario."""
    if test.scenario not in SCENARIOS:
        raise InvalidRequest(f"unknown scenario {test.scenario!r}; choose one of: {', '.join(SCENARIOS)}")
    if not test.host.startswith(("http://", "https://")):
        raise InvalidRequest(f"--host {test.host!r} is not a URL; give one like http://127.0.0.1:8000")
    try:
        offer = fetch_offer(test.host, test.options.rag)
    except urllib.error.HTTPError as exc:
        raise Unavailable(f"{test.host} answered {exc.code} to GET /v1/models; is it an OpenAI API?") from None
    except urllib.error.URLError as exc:
        raise Unavailable(f"cannot reach {test.host}: {exc.reason}", code="unreachable") from None
    except (OSError, ValueError) as exc:
        raise Unavailable(f"cannot read {test.host}/v1/models: {exc}", code="unreachable") from None
    why = offer.missing(test.scenario)
    if why is not None:
        raise InvalidRequest(why)
    return offer


def _watch(locust: ChildProcess, test: LoadTest, sampler: Sampler, err: Console) -> int:
    """Sample until locust exits; Ctrl-C lets it write its reports first."""
    what = f"{test.scenario}: {test.users} users" + ("" if test.web else f" for {test.duration_s} s")
    with err.status(f"{what}; locust's log: {test.out / LOCUST_LOG}") as status:
        try:
            while (code := locust.wait(test.sample_every_s)) is None:
                status.update(f"{what}; {_progress(sampler.take())}")
            return code
        except KeyboardInterrupt:
            status.update(f"stopping locust (it writes its reports); log: {test.out / LOCUST_LOG}")
            return _stop(locust)


@contextmanager
def _interruptible() -> Iterator[None]:
    """Ctrl-C and SIGTERM raise KeyboardInterrupt here, even where SIGINT came in ignored (a shell's background job)."""
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, signal.default_int_handler) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop(locust: ChildProcess) -> int:
    """Locust's exit code once it stopped: SIGINT first, then SIGTERM.

    Locust writes its CSVs and HTML report on either. A locust that started with SIGINT ignored only
    answers SIGTERM; one that answers neither is killed. (It runs in a session of its own: a terminal's
    Ctrl-C reaches only this process, which passes it on.)
    """
    code = locust.stop(steps=((signal.SIGINT, 10), (signal.SIGTERM, STOP_TIMEOUT_S + 10)))
    return -signal.SIGKILL if code is None else code


def _progress(sample: Sample) -> str:
    parts = [f"{sample.elapsed_s:.0f} s"]
    if sample.rss_bytes is not None:
        parts.append(f"target RSS {sample.rss_bytes / MIB:.0f} MiB")
    if sample.requests is not None:
        parts.append(f"{sample.requests:.0f} requests, {sample.failures or 0:.0f} failed (target's counters)")
    return ", ".join(parts)


def report(test: LoadTest, code: int, samples: Sequence[Sample], console: Console, err: Console) -> int:
    """Print the stats, failures and samples of a finished run; the exit code."""
    stats_path = test.out / f"{CSV_PREFIX}_stats.csv"
    rows = read_stats(stats_path) if stats_path.is_file() else []
    if rows:
        console.print(stats_table(rows, f"{test.scenario} against {test.host}"))
    failures = read_failures(test.out / f"{CSV_PREFIX}_failures.csv")
    if failures:
        table = Table("name", "error", "count", title="Failures", title_justify="left")
        for name, error, count in failures:
            table.add_row(name, error, str(count))
        console.print(table)
    growth = Growth.of(samples)
    if growth is None:
        console.print(f"{test.host}/metrics reports no process_resident_memory_bytes: memory not sampled")
    else:
        console.print(growth_line(growth))
        console.print(timeline_table(samples))
        plot_samples(samples, test.out / SAMPLES_PLOT, test.scenario)
    console.print(
        f"reports in {test.out}: {CSV_PREFIX}_stats.csv, {HTML_REPORT}, {SAMPLES}, {SAMPLES_PLOT}, {LOCUST_LOG}"
    )
    total = rows[-1] if rows else None
    if code == 0 and total is not None and total.requests == 0:
        err.print(f"[red]error[/]: no request was answered in {test.duration_s} s")
        return 1
    if code != 0 and (total is None or not total.failures):
        log = test.out / LOCUST_LOG
        err.print("\n".join(log.read_text(errors="replace").splitlines()[-15:]), markup=False, highlight=False)
        err.print(f"[red]error[/]: locust exited with code {code}; its log: {log}")
    return code or (1 if total is not None and total.failures else 0)


def stats_table(rows: Sequence[StatRow], title: str) -> Table:
    """Per request name: requests, failures, latency percentiles (ms) and throughput; ``Aggregated`` last."""
    table = Table("type", "name", "requests", "failures", "p50 ms", "p95 ms", "p99 ms", "req/s", title=title)
    table.title_justify = "left"
    for row in rows:
        if row is rows[-1] and len(rows) > 1:
            table.add_section()
        failures = f"[red]{row.failures}[/]" if row.failures else "0"
        percentiles = (_cell(p) for p in (row.p50, row.p95, row.p99))
        table.add_row(row.kind, row.name, str(row.requests), failures, *percentiles, f"{row.rps:.2f}")
    return table


def _cell(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.0f}"


def growth_line(growth: Growth) -> str:
    """One line: the target's RSS at start, end and max, its growth, and what its own counters saw."""
    line = (
        f"target RSS: start {growth.rss_start / MIB:.1f} MiB, end {growth.rss_end / MIB:.1f} MiB, "
        f"max {growth.rss_max / MIB:.1f} MiB, growth {growth.percent:+.1f}%"
    )
    if growth.requests is not None:
        line += f"; the target counted {growth.requests:.0f} requests, {growth.failures or 0:.0f} failed"
    return line


def plot_samples(samples: Sequence[Sample], path: Path, scenario: str) -> Path:
    """The target's RSS and failed requests over the run, one PNG (a soak's picture)."""
    from loadtest import plots

    first = next((s.failures for s in samples if s.failures is not None), 0.0) or 0.0
    rss = {"gateway RSS": [(s.elapsed_s, s.rss_bytes / 2**20) for s in samples if s.rss_bytes is not None]}
    failed = {"failed requests": [(s.elapsed_s, s.failures - first) for s in samples if s.failures is not None]}
    title = f"{scenario}: gateway memory and failed requests over time"
    return plots.lines(path, title, rss, "seconds", "RSS (MiB)", right=failed, right_label="failed requests")


def timeline_table(samples: Sequence[Sample]) -> Table:
    """The samples over time (at most ``TIMELINE_ROWS``, first and last included); counts since the start."""
    picked = sorted({round(i * (len(samples) - 1) / (TIMELINE_ROWS - 1)) for i in range(TIMELINE_ROWS)})
    first = samples[0]
    table = Table("elapsed s", "RSS MiB", "requests", "failed", title="Over time (samples.csv)", title_justify="left")
    for sample in (samples[i] for i in picked):
        table.add_row(
            f"{sample.elapsed_s:.0f}",
            "-" if sample.rss_bytes is None else f"{sample.rss_bytes / MIB:.1f}",
            _since(sample.requests, first.requests),
            _since(sample.failures, first.failures),
        )
    return table


def _since(value: float | None, start: float | None) -> str:
    return "-" if value is None else f"{value - (start or 0):.0f}"
