"""`quiver loadtest` end to end: every scenario for a few seconds against one real gateway on the session vLLM.

The scenarios run side by side (real processes: the CLI, locust), then hotswap with pushes on its own: it
deletes the versions it pushed, which churn, listing every version at its start, could be asking for.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from core import embedded
from core.embeddings import Embedder
from core.vllm_server import VllmServer
from gateway import Settings
from gateway.rag import index_url, ingest, open_index
from tests.integration.openai_helpers import push
from tests.servers import running_gateway

pytestmark = pytest.mark.slow

# Run -> its `quiver loadtest` options beyond the common ones; the scenario is the name up to a dash.
# Three mixed users ask for each kind (adapter, auto, rag) from their first request.
SIDE_BY_SIDE = {
    "base": (),
    "adapter": (),
    "churn": (),
    "streaming": (),
    "mixed": ("--users", "3", "--rag", "handbook"),
    "hotswap-aliases": (),  # no --push-dir: only moves the alias
    "mixed-failing": ("--users", "3", "--rag", "no-such-collection"),
}
HANDBOOK = "# Nimbus router\n\nTo reset the Nimbus router, hold the pin button for fifteen seconds.\n"


@dataclass(frozen=True)
class Target:
    """A gateway with two adapters (three versions), one described for `auto`, and a RAG collection."""

    url: str
    first: str
    second: str


@dataclass(frozen=True)
class Run:
    """A finished `quiver loadtest`: exit code, output, and requests and failures by (type, name)."""

    code: int
    output: str
    out: Path
    stats: dict[tuple[str, str], tuple[int, int]]

    def requests(self, name: str, kind: str = "POST") -> int:
        return self.stats.get((kind, name), (0, 0))[0]


@pytest.fixture(scope="module")
def target(
    vllm: VllmServer, base_model_dir: Path, lora_dirs: tuple[Path, ...], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Target]:
    root = tmp_path_factory.mktemp("loadtest")
    settings = Settings(
        vllm_url=vllm.url, base_model_path=base_model_dir, data_dir=root / "data", max_loras=2, fine_tuning_workers=0
    )
    settings.data_dir.mkdir()
    (root / "handbook.md").write_text(HANDBOOK)
    index = open_index(index_url(settings))
    try:
        ingest(index, Embedder(), "handbook", [root / "handbook.md"])
    finally:
        index.close()
    prefix = f"lt{uuid.uuid4().hex[:8]}"
    first, second = f"{prefix}a", f"{prefix}b"
    with running_gateway(settings) as gateway:
        for name, directory in ((first, lora_dirs[0]), (first, lora_dirs[1]), (second, lora_dirs[2])):
            assert push(gateway.url, name, directory).status_code == 201
        described = httpx.patch(f"{gateway.url}/v1/adapters/{first}", json={"description": "router and wifi help"})
        assert described.status_code == 200, described.text
        yield Target(gateway.url, first, second)


def start(target: Target, scenario: str, out: Path, *options: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "quiver.cli", "loadtest", "--scenario", scenario, "--host", target.url]
    # Six runs start at once on a small machine (each a locust process), and a first request may wait for its
    # adapter to load: 3 s once ended a run before any answer came back.
    command += ["--users", "2", "--spawn-rate", "10", "--duration", "6s", "--out", str(out), *options]
    env = dict(os.environ, COLUMNS="200")
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen[str], out: Path) -> Run:
    output, _ = process.communicate(timeout=240)
    stats: dict[tuple[str, str], tuple[int, int]] = {}
    if (out / "locust_stats.csv").is_file():
        with (out / "locust_stats.csv").open(newline="") as f:
            for row in csv.DictReader(f):
                stats[row["Type"], row["Name"]] = int(row["Request Count"]), int(row["Failure Count"])
    return Run(process.returncode, output, out, stats)


@pytest.fixture(scope="module")
def runs(target: Target, lora_dirs: tuple[Path, ...], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    root = tmp_path_factory.mktemp("loadtest-results")
    started = {name: start(target, name.split("-")[0], root / name, *options) for name, options in SIDE_BY_SIDE.items()}
    done = {name: finish(process, root / name) for name, process in started.items()}
    hotswap = start(target, "hotswap", root / "hotswap", "--push-dir", str(lora_dirs[1]))
    return done | {"hotswap": finish(hotswap, root / "hotswap")}


def expected_names(scenario: str, target: Target) -> list[tuple[str, str]]:
    """(type, name) rows that must have requests after a few seconds of the scenario."""
    first, live = target.first, f"{target.first}@live"
    return {
        "base": [("POST", embedded.SERVED_NAME)],
        "adapter": [("POST", first)],
        "churn": [],  # which versions Zipf picks in a few requests is chance; checked below
        "streaming": [("POST", f"{first} (stream)"), ("METRIC", "ttft"), ("METRIC", "itl")],
        "mixed": [("POST", "auto"), ("POST", "rag:handbook"), ("POST", first)],
        "hotswap-aliases": [("POST", live), ("PUT", "alias move"), ("PUT", "alias rollback")],
        "hotswap": [("POST", live), ("POST", "push"), ("PUT", "alias move"), ("PUT", "alias rollback")],
    }[scenario]


@pytest.mark.parametrize("scenario", [*(s for s in SIDE_BY_SIDE if s != "mixed-failing"), "hotswap"])
def test_scenario_runs_clean_and_writes_its_reports(scenario: str, runs: dict[str, Run], target: Target) -> None:
    run = runs[scenario]
    assert run.code == 0, run.output
    for report in (
        "locust_stats.csv",
        "locust_failures.csv",
        "report.html",
        "samples.csv",
        "samples.png",
        "locust.log",
    ):
        assert (run.out / report).is_file(), report
    assert run.stats[("", "Aggregated")][0] > 0 and run.stats[("", "Aggregated")][1] == 0, run.output
    for kind, name in expected_names(scenario, target):
        assert run.requests(name, kind) > 0, (kind, name, run.stats)
    if scenario == "churn":
        versions = {f"{target.first}@v1", f"{target.first}@v2", f"{target.second}@v1"}
        assert {name for _, name in run.stats if name != "Aggregated"} <= versions
    # The summary: the table from the stats CSV, and the gateway's memory from its /metrics.
    assert "Aggregated" in run.output and "target RSS: start" in run.output, run.output
    with (run.out / "samples.csv").open(newline="") as f:
        samples = list(csv.DictReader(f))
    assert sum(1 for s in samples if s["rss_bytes"] and int(s["rss_bytes"]) > 0) >= 2, samples


def test_hotswap_without_a_push_dir_says_it_only_moves_the_alias(runs: dict[str, Run]) -> None:
    assert "no --push-dir" in runs["hotswap-aliases"].output
    assert runs["hotswap-aliases"].requests("push") == 0


def test_a_failing_scenario_exits_non_zero_with_the_error_message(runs: dict[str, Run]) -> None:
    run = runs["mixed-failing"]
    assert run.code == 1, run.output
    assert run.stats[("POST", "rag:no-such-collection")][1] > 0
    assert run.stats[("POST", "auto")][0] > 0 and run.stats[("POST", "auto")][1] == 0, "the other kinds answer"
    errors = (run.out / "locust_failures.csv").read_text()
    assert "404: model 'rag:no-such-collection' does not exist" in errors  # the gateway's error message
    assert "Failures" in run.output


def test_web_mode_ends_on_ctrl_c_even_when_started_with_sigint_ignored(target: Target, tmp_path: Path) -> None:
    # A job a shell starts in the background has SIGINT ignored, and its children inherit that: locust too.
    command = [sys.executable, "-m", "quiver.cli", "loadtest", "--scenario", "base", "--host", target.url, "--web"]
    process = subprocess.Popen(
        [*command, "--users", "1", "--out", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )  # fmt: skip
    try:
        locust = _wait_for_web_ui(process, tmp_path / "locust.log")
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=90)
    finally:
        process.kill()
    assert "locust's web UI: http://127.0.0.1:" in output, output
    assert not Path(f"/proc/{locust}").exists(), "locust outlived the run"


def _wait_for_web_ui(process: subprocess.Popen[str], log: Path, timeout_s: float = 120) -> int:
    """Locust's pid once its log says the web UI is up."""
    deadline = time.monotonic() + timeout_s
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[0]
        pids = children.read_text().split() if children.exists() else []
        if pids and log.is_file() and "Starting web interface" in log.read_text():
            return int(pids[0])
        time.sleep(0.5)
    raise AssertionError(f"locust's web UI did not start in {timeout_s} s: {log.read_text() if log.is_file() else ''}")
