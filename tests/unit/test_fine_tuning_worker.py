"""The fine-tuning worker in-process on a tiny base: a job trained to a servable model, its events and
checkpoints, a cancel that stops training, a shutdown that requeues and resumes, and dead workers' jobs failed.
"""

from __future__ import annotations

import csv
import io
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from adapters import Registry
from core.errors import Conflict
from jobs.queue import Job, JobSpec, JobStore, Method, fine_tuned_model_name, resolve_hyperparameters
from jobs.workers import WorkerConfig, worker_name
from tests import factories
from tests.postgres import postgres_cluster  # noqa: F401 - a fixture, used by name
from training.worker import RUNS_DIR, Worker, pid_alive

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[JobStore]:
    jobs = JobStore.open(f"sqlite:///{tmp_path / 'quiver.db'}", tmp_path)
    yield jobs
    jobs.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobStore]:
    """The job store on each database the registry supports (no training runs on it)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'quiver.db'}"
    else:
        url = request.getfixturevalue("postgres_cluster").create_database()
    jobs = JobStore.open(url, tmp_path)
    yield jobs
    jobs.close()


def worker_config(tmp_path: Path, base: Path) -> WorkerConfig:
    return WorkerConfig(
        database_url=f"sqlite:///{tmp_path / 'quiver.db'}",
        data_dir=tmp_path,
        store_dir=tmp_path / "adapters",
        base_model_path=base,
        poll_s=0.05,
        heartbeat_s=0.05,
    )


def queued_job(store: JobStore, examples: int = 8, method: Method = "supervised", **hyperparameters: float) -> Job:
    data = factories.preference_jsonl(examples) if method == "dpo" else factories.chat_jsonl(examples, system=False)
    with store.files.staging() as directory:
        (directory / "train.jsonl").write_bytes(data)
        file = store.files.add_training_file(directory / "train.jsonl")
    spec = JobSpec(
        model="SmolLM2-Tiny",
        training_file=file.id,
        method=method,
        hyperparameters=resolve_hyperparameters(method, {"learning_rate_multiplier": 10, **hyperparameters}),
        suffix="unit",
    )
    job = store.validate(store.create(spec).id)
    assert job.status == "queued", job.error
    return job


def messages(store: JobStore, job_id: str) -> list[str]:
    return [e.message for e in reversed(store.events(job_id, limit=100).items)]


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_a_job_trains_into_a_servable_model_with_events_checkpoints_and_results(
    tiny_base: Path, store: JobStore, tmp_path: Path
) -> None:
    job = queued_job(store, n_epochs=2, batch_size=4)  # 7 training examples: 2 steps an epoch
    worker = Worker(worker_config(tmp_path, tiny_base), store)
    claimed = claim(worker, job)
    assert claimed.status == "running" and claimed.worker == worker.name
    worker.run_job(claimed)

    done = store.get(job.id)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == job.output_model == f"ft:smollm2-tiny:unit:{job.id}"
    assert done.trained_tokens and done.trained_tokens > 0 and done.finished_at is not None

    with Registry.open(f"sqlite:///{tmp_path / 'quiver.db'}", tmp_path / "adapters") as registry:
        final = registry.resolve(done.fine_tuned_model)
        assert final.manifest is not None and final.manifest["hyperparameters"]["epochs"] == 2
        checkpoints = sorted(store.checkpoints(job.id).items, key=lambda c: c.step_number)
        assert [c.step_number for c in checkpoints] == [2, 4], "one checkpoint an epoch"
        for checkpoint in checkpoints:
            assert registry.resolve(checkpoint.fine_tuned_model_checkpoint).name == done.fine_tuned_model
            assert {"train_loss", "valid_loss"} <= set(checkpoint.metrics)
        assert final.number == 3, "the checkpoints are versions 1 and 2, the final model the latest"

    log = messages(store, job.id)
    assert log[0] == f"Created fine-tuning job: {job.id}" and log[-1] == "The job has successfully completed"
    assert "Training started: 4 steps" in log
    metrics = [e for e in store.events(job.id, limit=100).items if e.type == "metrics"]
    assert {e.data["step"] for e in metrics if e.data and "train_loss" in e.data} == {1, 2, 3, 4}

    (result_id,) = done.result_files
    rows = list(csv.DictReader(io.StringIO(store.files.get(result_id).path.read_text())))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4] and rows[-1]["valid_loss"]
    assert not (tmp_path / RUNS_DIR / job.id).exists(), "the run's scratch space is cleaned up"


def test_a_dpo_job_trains_with_its_beta(tiny_base: Path, store: JobStore, tmp_path: Path) -> None:
    job = queued_job(store, method="dpo", n_epochs=1, batch_size=4, beta=0.25)
    worker = Worker(worker_config(tmp_path, tiny_base), store)
    worker.run_job(claim(worker, job))
    done = store.get(job.id)
    assert done.status == "succeeded", done.error
    with Registry.open(f"sqlite:///{tmp_path / 'quiver.db'}", tmp_path / "adapters") as registry:
        manifest = registry.resolve(job.output_model).manifest
    assert manifest is not None and manifest["method"] == "dpo" and manifest["hyperparameters"]["beta"] == 0.25


def claim(worker: Worker, job: Job) -> Job:
    claimed = worker.jobs.claim(worker.name)
    assert claimed is not None and claimed.id == job.id
    return claimed


def test_cancel_stops_a_running_job_between_steps(tiny_base: Path, store: JobStore, tmp_path: Path) -> None:
    job = queued_job(store, n_epochs=50, batch_size=1)  # 350 steps: far more than it gets to
    worker = Worker(worker_config(tmp_path, tiny_base), store)
    thread = threading.Thread(target=worker.run_job, args=(claim(worker, job),), daemon=True)
    thread.start()

    def trained_a_step() -> bool:
        return any(e.type == "metrics" for e in store.events(job.id, limit=5).items)

    wait_for(trained_a_step, "the first training step")
    assert store.cancel(job.id).status == "cancelled"
    thread.join(120)
    assert not thread.is_alive()
    stopped = store.get(job.id)
    assert stopped.status == "cancelled" and stopped.fine_tuned_model is None
    last = messages(store, job.id)[-1]
    assert last.startswith("Training stopped at step ") and last.endswith("the job is cancelled")
    assert int(last.split()[4].rstrip(":")) < 350
    assert not (tmp_path / RUNS_DIR / job.id).exists()


class StopAtFirstCheckpoint(JobStore):
    """The store, telling the worker to shut down once the first checkpoint is recorded."""

    worker: Worker

    def add_checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        checkpoint = super().add_checkpoint(*args, **kwargs)
        self.worker.stop()
        return checkpoint


def test_a_stopping_worker_requeues_its_job_which_resumes_from_its_checkpoint(
    tiny_base: Path, store: JobStore, tmp_path: Path
) -> None:
    job = queued_job(store, n_epochs=3, batch_size=4)  # 6 steps, a checkpoint every 2
    stopping_store = StopAtFirstCheckpoint.open(f"sqlite:///{tmp_path / 'quiver.db'}", tmp_path)
    first = Worker(worker_config(tmp_path, tiny_base), stopping_store)
    stopping_store.worker = first
    first.run_job(claim(first, job))

    requeued = store.get(job.id)
    assert requeued.status == "queued" and requeued.worker is None
    assert messages(store, job.id)[-1].startswith("Job queued again: its worker stopped at step 3")
    assert (tmp_path / RUNS_DIR / job.id / "checkpoints" / "checkpoint-2").is_dir(), "kept to resume from"

    second = Worker(worker_config(tmp_path, tiny_base), store)
    second.run_job(claim(second, job))
    assert store.get(job.id).status == "succeeded"
    assert "Training started: 6 steps, resuming at step 2" in messages(store, job.id)
    assert [c.step_number for c in store.checkpoints(job.id).items] == [6, 4, 2]


class CancelAsItSucceeds(JobStore):
    """The store, with the job cancelled just before its worker records success (the model already pushed)."""

    def succeed(self, job_id: str, worker: str, **kwargs: Any) -> bool:
        self.cancel(job_id)
        return super().succeed(job_id, worker, **kwargs)


def test_a_job_cancelled_as_it_finishes_leaves_no_model_or_results(tiny_base: Path, tmp_path: Path) -> None:
    store = CancelAsItSucceeds.open(f"sqlite:///{tmp_path / 'quiver.db'}", tmp_path)
    worker = Worker(worker_config(tmp_path, tiny_base), store)
    try:
        job = queued_job(store, n_epochs=1, batch_size=4)  # 2 steps, one checkpoint
        worker.run_job(claim(worker, job))
        done = store.get(job.id)
        assert done.status == "cancelled" and done.fine_tuned_model is None and done.result_files == ()
        assert [f.purpose for f in store.files.list_files().items] == ["fine-tune"], "no results file is left"
        with Registry.open(f"sqlite:///{tmp_path / 'quiver.db'}", tmp_path / "adapters") as registry:
            versions = registry.adapter(job.output_model).versions
        assert [v.number for v in versions] == [1], "the checkpoint stays; the final model is gone"
    finally:
        worker.close()


def test_a_starting_worker_removes_the_runs_of_finished_jobs(store: JobStore, tmp_path: Path) -> None:
    finished, waiting = queued_job(store), queued_job(store)
    store.cancel(finished.id)
    runs = tmp_path / RUNS_DIR
    for job_id in (finished.id, waiting.id, "ftjob-unknown"):  # as a worker killed with SIGKILL leaves them
        (runs / job_id / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    worker = Worker(worker_config(tmp_path, tmp_path), store)
    worker.stop()
    worker.run()
    assert [p.name for p in runs.iterdir()] == [waiting.id], "a queued job keeps its checkpoint to resume from"


def test_jobs_of_dead_or_silent_workers_fail_with_the_reason(any_store: JobStore) -> None:
    store = any_store
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    assert not pid_alive(pid)
    gone = queued_job(store)
    assert store.claim(worker_name(pid)) is not None
    silent = queued_job(store)
    assert store.claim("elsewhere:1") is not None

    host = worker_name(0).rpartition(":")[0]
    assert store.reap(host, pid_alive, stale_after_s=3600) == [gone.id], "a live-looking remote worker is trusted"
    error = store.get(gone.id).error
    assert error is not None and error.code == "worker_lost"
    assert f"worker process (pid {pid} on {host}) running this job exited without finishing it" in error.message

    time.sleep(0.01)
    assert store.reap(host, pid_alive, stale_after_s=0.001) == [silent.id]
    error = store.get(silent.id).error
    assert error is not None and "elsewhere:1" in error.message and "presumed dead" in error.message
    assert not store.succeed(silent.id, "elsewhere:1", fine_tuned_model="x", trained_tokens=1, result_files=[]), (
        "a worker given up on cannot finish its job later"
    )


def test_a_cancel_wins_over_the_worker_s_later_writes(any_store: JobStore) -> None:
    store = any_store
    job = queued_job(store)
    assert store.claim("host:1") is not None and store.claim("host:2") is None, "one job, one worker"
    assert store.heartbeat(job.id, "host:1") == "running"
    store.add_checkpoint(job.id, 2, f"{job.output_model}@v1", {"train_loss": 1.0})
    store.add_checkpoint(job.id, 2, f"{job.output_model}@v1", {"train_loss": 0.5})  # resumed, saved again
    (checkpoint,) = store.checkpoints(job.id).items
    assert checkpoint.metrics == {"step": 2, "train_loss": 0.5}
    with pytest.raises(Conflict):
        store.files.delete(job.training_file)

    assert store.cancel(job.id).status == "cancelled"
    assert store.heartbeat(job.id, "host:1") == "cancelled", "how the worker learns of it"
    assert not store.succeed(job.id, "host:1", fine_tuned_model="x", trained_tokens=1, result_files=[])
    assert not store.requeue(job.id, "host:1", "stopping")
    assert store.get(job.id).status == "cancelled"
    with pytest.raises(Conflict):
        store.cancel(job.id)
    store.files.delete(job.training_file)

    newest, older = store.events(job.id, limit=2), store.events(job.id, limit=100, after=None)
    assert newest.has_more and newest.items == older.items[:2]
    rest = store.events(job.id, limit=100, after=newest.items[-1].id)
    assert rest.items == older.items[2:] and not rest.has_more


def test_model_names_fit_the_registry_and_serve_with_colons(store: JobStore, tmp_path: Path) -> None:
    job_id, suffix = "ftjob-0123456789ab", "eighteen-chars-sfx"
    long = fine_tuned_model_name("meta-llama/Llama-3.1-8B-Instruct-with-a-long-name", suffix, job_id)
    assert len(long) == 64 and long.startswith("ft:meta-llama-llama-3.1-8b") and long.endswith(f":{suffix}:{job_id}")
    assert fine_tuned_model_name("SmolLM2-135M-Instruct", None, "ftjob-1") == "ft:smollm2-135m-instruct::ftjob-1"

    adapter = factories.make_lora_adapter(factories.tiny_llama_model(), tmp_path / "lora")
    with Registry.open(f"sqlite:///{tmp_path / 'names.db'}", tmp_path / "store") as registry:
        pushed = registry.push_dir(long, adapter)
        assert pushed.version.lora_name == f"{long}@v1"
        assert registry.snapshot().resolve(f"{long}@v1").path.is_dir()
        assert registry.resolve(long) == pushed.version
