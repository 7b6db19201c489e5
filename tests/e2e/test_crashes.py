"""kill -9 of a gateway process in the middle of an upload and of a fine-tuning job: after a restart on the same
data, no partial version is visible, the store holds only complete versions, and the job resumes (its worker
requeues it at its last step when the gateway that started it dies) or fails saying why."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from adapters.store import digest
from core.vllm_server import VllmServer
from tests import factories
from tests.e2e.test_fine_tuning_jobs import LONG, has_event, upload
from tests.integration.openai_helpers import client, push
from tests.servers import gateway_process, wait_until

pytestmark = pytest.mark.slow


def multipart(name: str, archive: bytes) -> tuple[bytes, str]:
    """An adapter upload's body and content type, as httpx would send them."""
    request = httpx.Request("POST", "http://x", data={"name": name}, files={"file": ("a.tar.gz", archive)})
    return request.read(), request.headers["content-type"]


def test_kill_9_mid_upload_and_mid_training_leaves_the_registry_consistent(
    vllm: VllmServer, base_model_dir: Path, lora_dirs: tuple[Path, ...], tmp_path: Path
) -> None:
    env = {
        "QUIVER_DATA_DIR": str(tmp_path / "data"),
        "QUIVER_BASE_MODEL_PATH": str(base_model_dir),
        "QUIVER_FINE_TUNING_WORKERS": "1",
        "QUIVER_FINE_TUNING_POLL_S": "0.2",
        "QUIVER_FINE_TUNING_HEARTBEAT_S": "0.5",
        "QUIVER_FINE_TUNING_STALE_AFTER_S": "5",
    }
    log = tmp_path / "gateway.log"
    archive = factories.tar_of(lora_dirs[0], tmp_path / "a.tar.gz").read_bytes()
    body, content_type = multipart("crashed", archive)
    half_sent = threading.Event()
    outcome: list[object] = []

    def slow_body() -> Iterator[bytes]:
        # Half the body, then nothing until the gateway is gone: the upload is cut off mid-way, for sure.
        yield body[: len(body) // 2]
        half_sent.set()
        time.sleep(60)
        yield body[len(body) // 2 :]

    with gateway_process(env, vllm.url, log) as first:
        api = client(first.url)
        job = api.fine_tuning.jobs.create(model="base", training_file=upload(api), method=LONG)  # type: ignore[arg-type]
        wait_until(lambda: has_event(api, job.id, "Step 1/"), timeout_s=300, what="the first training step")

        def send() -> None:
            headers = {"content-type": content_type, "content-length": str(len(body))}
            try:
                outcome.append(httpx.post(f"{first.url}/v1/adapters", content=slow_body(), headers=headers, timeout=90))
            except httpx.HTTPError as exc:
                outcome.append(exc)

        uploader = threading.Thread(target=send, daemon=True)
        uploader.start()
        assert half_sent.wait(30)
        time.sleep(0.5)  # let the gateway spool what it got
        os.kill(first.process.pid, signal.SIGKILL)
        assert first.process.wait(30) == -signal.SIGKILL
        uploader.join(90)
    assert outcome and isinstance(outcome[0], httpx.HTTPError), "the client saw the connection drop"

    with gateway_process(env, vllm.url, log) as second:
        # Nothing of the cut-off upload is visible, and every stored version is complete.
        assert httpx.get(f"{second.url}/v1/adapters").json()["data"] == []
        store = tmp_path / "data" / "adapters"
        versions = [p for p in store.glob("*/*") if p.is_dir() and not p.name.startswith(".")] if store.exists() else []
        assert versions == []
        # The job's worker outlived its gateway, saw it gone and requeued the job at its last step (then the new
        # gateway's worker resumes it); or the new gateway found the worker dead and failed the job, saying why.
        api = client(second.url)
        wait_until(
            lambda: (
                has_event(api, job.id, "Job queued again") or api.fine_tuning.jobs.retrieve(job.id).status == "failed"
            ),
            timeout_s=120,
            what="the job to be requeued or failed",
        )
        ended = api.fine_tuning.jobs.retrieve(job.id)
        if ended.status == "failed":
            assert ended.error is not None and ended.error.code == "worker_lost", ended.error
        else:
            wait_until(lambda: api.fine_tuning.jobs.retrieve(job.id).status == "running", 120, "the job to resume")
            api.fine_tuning.jobs.cancel(job.id)
        assert api.fine_tuning.jobs.retrieve(job.id).fine_tuned_model is None  # no partial model was pushed
        print(f"job after the crash: {'failed (worker_lost)' if ended.status == 'failed' else 'requeued and resumed'}")

        # The same upload, retried, goes through and is served.
        assert push(second.url, "crashed", lora_dirs[0]).status_code == 201
        [adapter] = httpx.get(f"{second.url}/v1/adapters").json()["data"]
        [stored] = [d for d in (store / "crashed").iterdir() if not d.name.startswith(".")]
        assert [v["sha256"] for v in adapter["versions"]] == [stored.name] == [digest(stored)]
