"""Fine-tuning jobs end to end: the official openai client, a real gateway, real worker processes, real vLLM.

A small SFT job on the served base model goes from an uploaded file to a model the gateway serves at
once; a job cancelled while it trains stops training; a job whose worker is killed fails saying so; a
queued job waits across a gateway restart; a bad file is refused naming its line.
"""

from __future__ import annotations

import csv
import io
import os
import signal
import time
from collections.abc import Collection

import openai
import pytest
from openai import OpenAI
from openai.types.fine_tuning import FineTuningJob

from gateway import Settings
from tests.factories import chat_jsonl
from tests.integration.openai_helpers import QUESTION, client
from tests.servers import GatewayServer, running_gateway, wait_until

pytestmark = pytest.mark.slow

TERMINAL = {"succeeded", "failed", "cancelled"}
# Long enough that a test acts while it trains: 14 training examples, one a step.
LONG = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 50, "batch_size": 1}}}


def with_workers(settings: Settings, workers: int = 1) -> Settings:
    return settings.model_copy(
        update={
            "fine_tuning_workers": workers,
            "fine_tuning_poll_s": 0.2,
            "fine_tuning_heartbeat_s": 0.5,
            "fine_tuning_stale_after_s": 30.0,
        }
    )


def upload(api: OpenAI, examples: int = 16) -> str:
    # No system prompt: shorter sequences, faster steps on a CPU.
    return api.files.create(file=("train.jsonl", chat_jsonl(examples, system=False)), purpose="fine-tune").id


def wait_for_status(api: OpenAI, job_id: str, wanted: Collection[str], timeout_s: float = 600) -> FineTuningJob:
    """Poll the job as a client would; fail at once, with its log, if it ends in another status."""
    deadline = time.monotonic() + timeout_s
    while True:
        job = api.fine_tuning.jobs.retrieve(job_id)
        if job.status in wanted:
            return job
        if job.status in TERMINAL or time.monotonic() > deadline:
            log = [e.message for e in api.fine_tuning.jobs.list_events(job_id, limit=100).data]
            raise AssertionError(f"job {job_id} is {job.status} (error {job.error}); events, newest first: {log}")
        time.sleep(0.5)


def has_event(api: OpenAI, job_id: str, start: str) -> bool:
    return any(e.message.startswith(start) for e in api.fine_tuning.jobs.list_events(job_id, limit=100).data)


def test_openai_client_fine_tunes_a_model_the_gateway_then_serves(settings: Settings) -> None:
    with running_gateway(with_workers(settings)) as gateway:
        api = client(gateway.url)
        training_file = upload(api, examples=8)  # 7 to train on, 1 held out
        started = time.monotonic()
        job = api.fine_tuning.jobs.create(
            model="base",
            training_file=training_file,
            suffix="triage",
            seed=1,
            method={
                "type": "supervised",
                "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 5}},
            },
        )
        assert job.status == "validating_files"
        done = wait_for_status(api, job.id, {"succeeded"})
        took = time.monotonic() - started
        at = {e.message.split(":")[0]: e.created_at - job.created_at for e in api.fine_tuning.jobs.list_events(job.id)}
        print(
            f"\n{job.id}: succeeded {took:.0f} s after creation (claimed at +{at['Fine-tuning job started']} s, "
            f"training started at +{at['Training started']} s, pushed at +{at['New fine-tuned model created']} s)"
        )

        model = f"ft:smollm2-135m-instruct:triage:{job.id}"
        assert done.fine_tuned_model == model and done.model == "SmolLM2-135M-Instruct"
        assert done.trained_tokens and done.trained_tokens > 0 and done.finished_at and done.error is None

        events = api.fine_tuning.jobs.list_events(job.id, limit=100).data
        statuses = [e.message for e in reversed(events) if not e.type == "metrics"]
        for step in ("Files validated", "Fine-tuning job started", "Training started: 2 steps", "New fine-tuned"):
            assert any(m.startswith(step) for m in statuses), (step, statuses)
        losses = [e.data for e in events if e.type == "metrics" and isinstance(e.data, dict) and "train_loss" in e.data]
        assert sorted(d["step"] for d in losses) == [1, 2]

        (checkpoint,) = api.fine_tuning.jobs.checkpoints.list(job.id).data
        assert checkpoint.step_number == 2 and checkpoint.fine_tuned_model_checkpoint == f"{model}@v1"
        assert checkpoint.metrics.train_loss is not None and checkpoint.metrics.valid_loss is not None

        # Served at once, under the name, and the checkpoint under its own.
        for name, served_by in ((model, f"{model}@v2"), (checkpoint.fine_tuned_model_checkpoint, f"{model}@v1")):
            raw = api.chat.completions.with_raw_response.create(model=name, messages=QUESTION, max_tokens=8)  # type: ignore[arg-type]
            assert raw.headers["x-quiver-served-by"] == served_by
            assert raw.parse().choices[0].message.content
        assert model in {m.id for m in api.models.list()}

        (result_file,) = done.result_files
        rows = list(csv.DictReader(io.StringIO(api.files.content(result_file).text)))
        assert [r["step"] for r in rows] == ["1", "2"] and rows[-1]["valid_loss"]
        assert api.files.retrieve(result_file).purpose == "fine-tune-results"


def test_a_queued_job_waits_across_a_restart_and_a_cancel_stops_it_training(settings: Settings) -> None:
    with running_gateway(settings) as first:  # no workers: jobs can only queue
        api = client(first.url)
        training_file = upload(api)
        job = api.fine_tuning.jobs.create(model="base", training_file=training_file, method=LONG)  # type: ignore[arg-type]
        assert wait_for_status(api, job.id, {"queued"}).status == "queued"
        never = api.fine_tuning.jobs.create(model="base", training_file=training_file)
        assert api.fine_tuning.jobs.cancel(never.id).status == "cancelled", "a job is cancelled before it runs"

    with running_gateway(with_workers(settings)) as second:
        api = client(second.url)
        wait_for_status(api, job.id, {"running"}, timeout_s=120)
        wait_until(lambda: has_event(api, job.id, "Step 1/"), timeout_s=300, what="the first training step")
        cancelled = api.fine_tuning.jobs.cancel(job.id)
        assert cancelled.status == "cancelled" and cancelled.fine_tuned_model is None
        wait_until(lambda: has_event(api, job.id, "Training stopped at step"), timeout_s=120, what="training to stop")
        assert api.fine_tuning.jobs.retrieve(never.id).status == "cancelled", "it never ran"
        with pytest.raises(openai.ConflictError):
            api.fine_tuning.jobs.cancel(job.id)


def test_a_job_whose_worker_is_killed_fails_with_the_reason(settings: Settings) -> None:
    with running_gateway(with_workers(settings)) as gateway:
        api = client(gateway.url)
        job = api.fine_tuning.jobs.create(model="base", training_file=upload(api), method=LONG)  # type: ignore[arg-type]
        wait_for_status(api, job.id, {"running"}, timeout_s=120)
        (pid,) = workers_of(gateway)
        os.kill(pid, signal.SIGKILL)
        failed = wait_for_status(api, job.id, {"failed"}, timeout_s=60)
        assert failed.error is not None and failed.error.code == "worker_lost"
        assert f"worker (pid {pid}) was killed by SIGKILL" in failed.error.message
        wait_until(lambda: workers_of(gateway) not in ([], [pid]), timeout_s=30, what="a new worker")


def workers_of(gateway: GatewayServer) -> list[int]:
    pids: list[int] = gateway.app.state.fine_tuning.workers.pids
    return pids


def test_a_bad_training_file_is_refused_naming_the_line(gateway: GatewayServer) -> None:
    good = chat_jsonl(2).decode().splitlines()
    bad = "\n".join([good[0], '{"messages": [{"role": "user", "content": "no answer"}]}', good[1]]) + "\n"
    api = client(gateway.url)
    with pytest.raises(openai.BadRequestError) as caught:
        api.files.create(file=("train.jsonl", bad.encode()), purpose="fine-tune")
    assert "train.jsonl:2: the last message is from the user" in caught.value.message
    assert caught.value.code == "invalid_training_data"  # type: ignore[attr-defined]
    assert api.files.list().data == []
