"""The real gateway process never imports torch: ``quiver up`` in front of the session's vLLM, under the import guard.

The gateway runs as a process of its own with the tests' import guard (``tests/import_guard``), which refuses torch,
transformers, peft, trl and sentence-transformers and logs every attempt, even one the code catches. Through it:
a chat completion, a stream, adapters pushed with bf16 and with fp32 weights, ``model="auto"``, a RAG collection,
and a fine-tuning job, whose worker (a child, unguarded) trains with torch. After each, the guard saw no attempt
and no libtorch is mapped into the gateway's memory (/proc/PID/maps); the worker's maps show libtorch, so the check
can see it where it is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch

from core import embedded
from core.vllm_server import VllmServer
from tests import factories as f
from tests import import_guard
from tests.e2e.test_fine_tuning_jobs import upload, wait_for_status
from tests.integration.openai_helpers import QUESTION, client, push
from tests.integration.test_rag_path import HANDBOOK
from tests.servers import GatewayProcess, gateway_process, wait_until

pytestmark = pytest.mark.slow

LIBTORCH = ("libtorch.so", "libtorch_cpu.so", "libtorch_cuda.so", "libtorch_python.so")


def mapped_libtorch(pid: int) -> list[str]:
    """The libtorch shared objects mapped into ``pid``'s memory."""
    paths = {line.split()[-1] for line in Path(f"/proc/{pid}/maps").read_text().splitlines() if "/" in line}
    return sorted(p for p in paths if Path(p).name.startswith(LIBTORCH))


@dataclass
class Guarded:
    """The guarded gateway process, its data dir and the guard's log."""

    gateway: GatewayProcess
    data_dir: Path
    log: Path

    @property
    def url(self) -> str:
        return self.gateway.url

    @property
    def pid(self) -> int:
        return self.gateway.process.pid

    def mark(self) -> int:
        """Where the guard's log ends now."""
        return self.log.stat().st_size if self.log.exists() else 0

    def assert_lean_since(self, mark: int) -> None:
        """No import refused since ``mark``, and no libtorch in the gateway's memory."""
        tried = import_guard.attempts(self.log, mark)
        assert tried == [], f"the gateway tried to import {len(tried)} time(s); the first:\n{tried[0]}"
        assert mapped_libtorch(self.pid) == []


@pytest.fixture(scope="module")
def guarded(vllm: VllmServer, base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guarded]:
    work = tmp_path_factory.mktemp("guarded")
    log = work / "refused-imports.log"
    settings = {
        "QUIVER_DATA_DIR": str(work / "data"),
        "QUIVER_BASE_MODEL_PATH": str(base_model_dir),
        "QUIVER_MAX_LORAS": "2",
        "QUIVER_HEALTH_INTERVAL_S": "0.2",
        "QUIVER_REGISTRY_REFRESH_S": "0.2",
        "QUIVER_FINE_TUNING_WORKERS": "1",
        "QUIVER_FINE_TUNING_POLL_S": "0.2",
        "QUIVER_FINE_TUNING_HEARTBEAT_S": "0.5",
        "QUIVER_FINE_TUNING_STALE_AFTER_S": "30",
    }
    env = {**import_guard.environment(log), **settings}
    with gateway_process(env, vllm.url, work / "gateway.log") as gateway:
        yield Guarded(gateway, work / "data", log)


def test_the_guard_is_on_in_the_gateway_process(guarded: Guarded, tmp_path: Path) -> None:
    """The guard's own check: the same environment makes a process whose torch import is refused and logged."""
    log = tmp_path / "refused.log"
    done = subprocess.run(
        [sys.executable, "-c", "import torch"], env=import_guard.environment(log), capture_output=True, text=True
    )
    assert done.returncode == 1 and "torch imported in a process that must not import it" in done.stderr
    assert len(import_guard.attempts(log)) == 1
    # /proc shows the environment a process started with: the gateway's had the guard on (it then took the
    # variable out, so what it starts runs unguarded: see the fine-tuning worker below).
    environ = Path(f"/proc/{guarded.pid}/environ").read_bytes().split(b"\0")
    assert any(v.startswith(b"QUIVER_TEST_IMPORT_GUARD=") for v in environ), "started with the guard on"
    assert guarded.mark() == 0, "nothing refused at start-up"
    guarded.assert_lean_since(0)


def test_a_chat_completion_and_a_stream(guarded: Guarded) -> None:
    mark = guarded.mark()
    with client(guarded.url) as api:
        answer = api.chat.completions.create(model="base", messages=QUESTION, max_tokens=8)  # type: ignore[arg-type]
        assert answer.choices[0].message.content
        stream = api.chat.completions.create(model="base", messages=QUESTION, max_tokens=8, stream=True)  # type: ignore[arg-type]
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    guarded.assert_lean_since(mark)


def test_adapters_with_bf16_and_fp32_weights(guarded: Guarded, lora_dirs: tuple[Path, ...], tmp_path: Path) -> None:
    bf16 = f.with_dtype(f.copy_adapter(lora_dirs[0], tmp_path / "bf16"), torch.bfloat16)
    fp32 = f.with_dtype(f.copy_adapter(lora_dirs[1], tmp_path / "fp32"), torch.float32)
    mark = guarded.mark()
    for name, directory in (("guarded-bf16", bf16), ("guarded-fp32", fp32)):
        pushed = push(guarded.url, name, directory)
        assert pushed.status_code == 201, pushed.text
        body = {"model": name, "messages": QUESTION, "max_tokens": 8}
        answer = httpx.post(f"{guarded.url}/v1/chat/completions", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-quiver-served-by"] == f"{name}@v1"
    guarded.assert_lean_since(mark)


def test_auto_routes_by_description(guarded: Guarded, lora_dirs: tuple[Path, ...]) -> None:
    mark = guarded.mark()
    # A description alone scores 0.24 against the question, under the default threshold (0.35): examples too.
    for name, directory, description, examples in (
        ("guarded-recipes", lora_dirs[0], "Cooking recipes and kitchen questions", ["How long do I boil an egg?"]),
        ("guarded-invoices", lora_dirs[1], "Billing, invoices and refunds", ["I was charged twice"]),
    ):
        assert push(guarded.url, name, directory).status_code == 201
        routing = {"description": description, "examples": examples}
        patched = httpx.patch(f"{guarded.url}/v1/adapters/{name}", json=routing)
        assert patched.status_code == 200, patched.text
    body = {"model": "auto", "messages": [{"role": "user", "content": "How long should I boil rice?"}], "max_tokens": 4}
    answer = httpx.post(f"{guarded.url}/v1/chat/completions", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-quiver-served-by"] == "guarded-recipes@v1"
    assert answer.headers["x-quiver-route"].startswith("auto:guarded-recipes;score=")
    guarded.assert_lean_since(mark)


def test_a_rag_collection(guarded: Guarded, tmp_path: Path) -> None:
    files = []
    for name, text in HANDBOOK.items():
        (tmp_path / name).write_text(text)
        files.append(str(tmp_path / name))
    # Ingested by the CLI (the full install); the gateway only embeds the questions.
    env = dict(os.environ, QUIVER_DATA_DIR=str(guarded.data_dir))
    command = [sys.executable, "-m", "quiver.cli", "rag", "ingest", "handbook", *files]
    ingested = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert ingested.returncode == 0, ingested.stderr
    mark = guarded.mark()
    wait_until(
        lambda: "rag:handbook" in {m["id"] for m in httpx.get(f"{guarded.url}/v1/models").json()["data"]},
        timeout_s=30,
        what="the gateway to list the collection",
    )
    question = [{"role": "user", "content": "How do I reset my Nimbus router?"}]
    body = {"model": "rag:handbook", "messages": question, "max_tokens": 8}
    answer = httpx.post(f"{guarded.url}/v1/chat/completions", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    assert json.loads(answer.headers["x-quiver-sources"])[0]["source"] == "router.md"
    guarded.assert_lean_since(mark)


def test_a_fine_tuning_job_trains_in_an_unguarded_worker(guarded: Guarded) -> None:
    mark = guarded.mark()
    with client(guarded.url) as api:
        job = api.fine_tuning.jobs.create(
            model="base",
            training_file=upload(api, examples=8),
            suffix="guarded",
            seed=1,
            method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 4}}},
        )
        done = wait_for_status(api, job.id, {"succeeded"})
        assert done.fine_tuned_model
        answer = api.chat.completions.create(model=done.fine_tuned_model, messages=QUESTION, max_tokens=8)  # type: ignore[arg-type]
        assert answer.choices[0].message.content
    guarded.assert_lean_since(mark)
    # The worker, a child of the gateway, trained with torch: its maps show libtorch, without the guard or the
    # gateway's thread caps in its environment.
    [worker] = children(guarded.pid)
    assert mapped_libtorch(worker)
    environ = Path(f"/proc/{worker}/environ").read_bytes().split(b"\0")
    names = {v.partition(b"=")[0].decode() for v in environ}
    assert not {"QUIVER_TEST_IMPORT_GUARD", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "QUIVER_THREADS_CAPPED"} & names


def children(pid: int) -> list[int]:
    """The live child processes of ``pid``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if fields[1] == str(pid) and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def test_the_gateway_never_imported_torch(guarded: Guarded) -> None:
    """The whole session, background tasks between the requests included; and the gateway still serves."""
    assert httpx.get(f"{guarded.url}/health").status_code == 200
    guarded.assert_lean_since(0)
    assert embedded.SERVED_NAME in httpx.get(f"{guarded.url}/v1/models").text
