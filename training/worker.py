"""The fine-tuning worker: a process that claims queued jobs from the database one at a time and trains them.

    python -m training.worker --data-dir DIR --store-dir DIR --base-model-path DIR [--database-url URL]

The gateway starts ``QUIVER_FINE_TUNING_WORKERS`` of these (the database URL comes in the environment,
``QUIVER_DATABASE_URL``, so a password never shows in ``ps``) and stops them with SIGTERM; one can also
run on its own, on a machine that shares the database and the data dir. Training runs here, never
in the gateway's event loop.

While a job runs, a heartbeat thread tells the database that this worker is alive and learns whether
the job was cancelled; the trainer checks between steps and stops. Each checkpoint is pushed to the
registry as a version of the job's model, so it can be served at once. SIGTERM stops the worker: a
running job stops at its next step and goes back to the queue, to resume from its last checkpoint.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import shutil
import signal
import socket
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Literal

from adapters import BaseModelSpec, Registry
from core.errors import NotFound, QuiverError
from jobs import db
from jobs.queue import Job, JobError, JobStore
from jobs.workers import WorkerConfig, parse_args, worker_name
from training.config import DEFAULT_LR, VLLM_LORA_RANKS, TrainConfig
from trainingdata.formats import DataError

if TYPE_CHECKING:
    from training.sft import TrainResult

log = logging.getLogger("quiver.worker")

# LoRA rank of fine-tuning jobs (OpenAI exposes none): 16, or the largest slot the served vLLM allows below it.
DEFAULT_RANK = 16
RUNS_DIR = "fine_tuning"


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def train_config(job: Job, base_model: Path, output_dir: Path, max_lora_rank: int) -> TrainConfig:
    """The training run a job asks for: its hyperparameters, one checkpoint (and evaluation) per epoch."""
    hp = job.hyperparameters
    method: Literal["sft", "dpo"] = "dpo" if job.method == "dpo" else "sft"
    # OpenAI checkpoints once per epoch; the split's size is known from validation.
    steps_per_epoch = max(1, math.ceil((job.train_examples or 1) / hp.batch_size))
    rank = max(r for r in VLLM_LORA_RANKS if r <= min(DEFAULT_RANK, max_lora_rank))
    extra: dict[str, Any] = {"beta": hp.beta} if hp.beta is not None else {}
    return TrainConfig(
        base_model=base_model,
        output_dir=output_dir,
        method=method,
        rank=rank,
        alpha=2 * rank,
        epochs=float(hp.n_epochs),
        lr=DEFAULT_LR[method] * hp.learning_rate_multiplier,
        batch_size=hp.batch_size,
        seed=job.seed,
        logging_steps=1,
        save_steps=steps_per_epoch,
        save_total_limit=3,
        max_lora_rank=max_lora_rank,
        base_model_name=job.model,
        **extra,
    )


def metrics_csv(result: TrainResult) -> bytes:
    """The job's result file: training and validation loss per step, as OpenAI's ``step_metrics.csv``."""
    val = {p.step: p.loss for p in result.manifest.val_loss}
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["step", "train_loss", "valid_loss"])
    steps = sorted({p.step for p in result.manifest.train_loss} | set(val))
    train = {p.step: p.loss for p in result.manifest.train_loss}
    for step in steps:
        writer.writerow([step, train.get(step, ""), val.get(step, "")])
    return out.getvalue().encode()


class _Run:
    """One job on this worker: why it should stop, if it should, as the heartbeat and signals learn it."""

    def __init__(self, job: Job, stopping: threading.Event) -> None:
        self.job = job
        self.status = job.status
        self._stopping = stopping

    def stop_reason(self) -> str | None:
        """``shutdown``, the job's status if it is no longer running (``cancelled``, ...), or None to go on."""
        if self._stopping.is_set():
            return "shutdown"
        if self.status != "running":
            return self.status
        return None


class Worker:
    """Claims queued jobs one at a time and runs each to a terminal status (or back to the queue on shutdown)."""

    def __init__(self, config: WorkerConfig, jobs: JobStore) -> None:
        self.config = config
        self.jobs = jobs
        self.host = socket.gethostname()
        self.name = worker_name(os.getpid())
        self._stopping = threading.Event()
        self._registry: Registry | None = None
        self._parent = os.getppid() if config.exit_with_parent else None

    def stop(self) -> None:
        """Finish the current training step, put its job back in the queue, and return from ``run``."""
        self._stopping.set()

    def run(self) -> None:
        """Work until ``stop``: give up on jobs of dead workers, claim the oldest queued job, run it."""
        log.info("fine-tuning worker %s polling %s", self.name, self.config.data_dir)
        self._sweep_runs()
        while not self._stopping.is_set():
            self._stop_if_orphaned()
            for job_id in self.jobs.reap(self.host, pid_alive, self.config.stale_after_s):
                log.warning("job %s failed: its worker is gone", job_id)
            job = self.jobs.claim(self.name)
            if job is None:
                self._stopping.wait(self.config.poll_s)
                continue
            self.run_job(job)

    def run_job(self, job: Job) -> None:
        """Train one claimed job and record how it ended."""
        log.info("running %s", job.id)
        run = _Run(job, self._stopping)
        done = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(run, done), name=f"heartbeat-{job.id}", daemon=True)
        beat.start()
        output = self.config.data_dir / RUNS_DIR / job.id
        requeued = False
        try:
            requeued = self._train(run, output)
        except QuiverError as exc:
            self.jobs.fail(job.id, JobError.of(exc), only_worker=self.name)
        except Exception as exc:
            log.exception("job %s failed", job.id)
            error = JobError("training_failed", f"training failed: {type(exc).__name__}: {exc}")
            self.jobs.fail(job.id, error, only_worker=self.name)
        finally:
            done.set()
            beat.join()
            if not requeued:
                shutil.rmtree(output, ignore_errors=True)

    def _train(self, run: _Run, output: Path) -> bool:
        """Train, then push and succeed, or record why not; True if the job went back to the queue."""
        # Imported here, not above: the gateway imports this module to start workers, and the trainer's
        # imports (peft, bitsandbytes, accelerate) cost it seconds and memory it never uses.
        from training.progress import StepReporter
        from training.train import train

        job = run.job
        files = self.jobs.files_of(job)
        config = train_config(job, self.config.base_model_path, output, self.config.max_lora_rank)
        # A job back from the queue resumes from its last checkpoint; an adapter written as it stopped is stale.
        shutil.rmtree(config.adapter_dir, ignore_errors=True)
        shutil.rmtree(output / ".adapter-staging", ignore_errors=True)
        resume = any(config.checkpoint_dir.glob("checkpoint-*"))
        reporter = StepReporter(
            lambda message, kind, data: self.jobs.add_event(job.id, message, type=kind, data=data),
            lambda directory, step, metrics: self._checkpoint(job, directory, step, metrics),
            lambda: run.stop_reason() is not None,
        )
        try:
            result = train(config, files.training.path, val=files.validation_path, resume=resume, callbacks=[reporter])
        except DataError as exc:
            raise files.relabel(exc) from None
        except ModuleNotFoundError as exc:
            # TRL, datasets and friends are imported as training starts; `make up` installs no training extra.
            raise QuiverError(
                f"this worker cannot train: {exc}; install the training libraries (pip install 'quiver[training]')",
                code="training_unavailable",
            ) from None
        reason = run.stop_reason()
        if reason == "shutdown":
            step = result.global_step
            return self.jobs.requeue(job.id, self.name, f"its worker stopped at step {step}; it resumes from there")
        if reason is not None:
            self.jobs.add_event(job.id, f"Training stopped at step {result.global_step}: the job is {reason}")
            return False
        registry = self._registry_of(job)
        pushed = registry.push_dir(job.output_model, result.adapter_dir)
        results = None
        finished = False
        try:
            results = self.jobs.files.add_result_file("step_metrics.csv", metrics_csv(result))
            tokens = int(result.manifest.result.get("input_tokens") or 0)
            finished = self.jobs.succeed(
                job.id, self.name, fine_tuned_model=job.output_model, trained_tokens=tokens, result_files=[results.id]
            )
        finally:
            # Cancelled or given up on meanwhile, or storing the results failed: an unfinished job leaves no
            # final model and no results behind.
            if not finished:
                if results is not None:
                    self.jobs.files.delete(results.id)
                if pushed.created:
                    registry.delete_version(job.output_model, pushed.version.number)
        return False

    def _checkpoint(self, job: Job, directory: Path, step: int, metrics: Mapping[str, float]) -> None:
        """Push a trainer checkpoint's adapter as a version of the job's model and record it."""
        from training.sft import ADAPTER_FILES

        staged = directory.parent / f".{directory.name}-adapter"
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir()
        try:
            for name in ADAPTER_FILES:  # the checkpoint also holds optimizer state, which is not an adapter's
                shutil.copyfile(directory / name, staged / name)
            pushed = self._registry_of(job).push_dir(job.output_model, staged)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        self.jobs.add_checkpoint(job.id, step, pushed.version.lora_name, metrics)

    def _registry_of(self, job: Job) -> Registry:
        if self._registry is None:
            base = BaseModelSpec.from_model_dir(self.config.base_model_path, job.model)
            # No reserved names: a job's model names all start with "ft:", which no reserved name does.
            self._registry = Registry.open(
                self.config.database_url, self.config.store_dir, base=base, max_lora_rank=self.config.max_lora_rank
            )
        return self._registry

    def _sweep_runs(self) -> None:
        """Delete the scratch space of finished jobs: a worker killed mid-run (kill -9) leaves its run behind."""
        runs = self.config.data_dir / RUNS_DIR
        for run in sorted(runs.iterdir()) if runs.is_dir() else ():
            try:
                finished = self.jobs.get(run.name).status in db.TERMINAL_STATUSES
            except NotFound:
                finished = True
            if finished:
                log.info("removing %s, left behind by a worker that stopped without finishing it", run)
                shutil.rmtree(run, ignore_errors=True)

    def _stop_if_orphaned(self) -> None:
        if self._parent is not None and os.getppid() != self._parent:
            log.warning("the gateway that started this worker (pid %d) is gone; stopping", self._parent)
            self.stop()

    def _heartbeat(self, run: _Run, done: threading.Event) -> None:
        while not done.wait(self.config.heartbeat_s):
            self._stop_if_orphaned()
            try:
                run.status = self.jobs.heartbeat(run.job.id, self.name)
            except Exception:
                log.exception("heartbeat for %s failed; trying again", run.job.id)

    def close(self) -> None:
        """Release the registry and the database."""
        if self._registry is not None:
            self._registry.close()
        self.jobs.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Run a worker until SIGTERM or SIGINT."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = parse_args(argv)
    worker = Worker(config, JobStore.open(config.database_url, config.data_dir))

    def _stop(signum: int, frame: FrameType | None) -> None:
        log.info("%s: stopping after the current training step", signal.Signals(signum).name)
        worker.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        worker.run()
    finally:
        worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
