"""The fine-tuning worker processes a gateway runs: started with it, watched, restarted, stopped with it.

Each is ``python -m training.worker`` in a session of its own (a Ctrl-C at the terminal reaches the
gateway, which then stops the workers in order). A worker that dies is restarted, and the job it
was running is failed at once with how it died; the job is not retried, since whatever killed the
worker (memory, a bad example) would likely kill it again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import anyio.to_thread

from core import threads
from jobs.queue import JobStore
from jobs.workers import WORKER_MODULE, WorkerConfig, worker_name

log = logging.getLogger("quiver.workers")

# A worker that dies again at once is restarted after a growing pause, up to this.
MAX_RESTART_DELAY_S = 60.0


@dataclass
class _Slot:
    index: int
    process: subprocess.Popen[bytes] | None = None
    log_file: IO[bytes] | None = None
    started: float = 0.0
    failures: int = 0
    restart_at: float = field(default=0.0)


def exit_reason(returncode: int) -> str:
    """How a process ended, as a person reads it: ``killed by SIGKILL``, ``exited with status 1``."""
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


class WorkerPool:
    """``count`` worker processes for one gateway."""

    def __init__(self, config: WorkerConfig, count: int, jobs: JobStore, log_dir: Path) -> None:
        self.config = config
        self.jobs = jobs
        self.log_dir = log_dir
        self._slots = [_Slot(i) for i in range(count)]

    @property
    def pids(self) -> list[int]:
        """Process ids of the workers running now."""
        return [s.process.pid for s in self._slots if s.process is not None and s.process.poll() is None]

    def start(self) -> None:
        """Start every worker (blocking: call it from a thread)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for slot in self._slots:
            self._spawn(slot)

    def _spawn(self, slot: _Slot) -> None:
        if slot.log_file is None:
            slot.log_file = (self.log_dir / f"fine-tuning-worker-{slot.index}.log").open("ab")
        # The URL travels in the environment so that a database password never shows in `ps`.
        # Training uses every core: not the gateway's own thread caps.
        env = {**threads.uncapped(os.environ), "QUIVER_DATABASE_URL": self.config.database_url, "PYTHONUNBUFFERED": "1"}
        slot.process = subprocess.Popen(
            [sys.executable, "-m", WORKER_MODULE, *self.config.args()],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=slot.log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        slot.started = time.monotonic()
        log.info("fine-tuning worker %d started (pid %d)", slot.index, slot.process.pid)

    async def watch(self, interval_s: float = 0.5) -> None:
        """Until cancelled: notice dead workers, fail what they were running, restart them."""
        while True:
            await asyncio.sleep(interval_s)
            for slot in self._slots:
                try:
                    await self._check(slot)
                except Exception:
                    log.exception("watching fine-tuning worker %d failed", slot.index)

    async def _check(self, slot: _Slot) -> None:
        process = slot.process
        if process is not None:
            code = process.poll()
            if code is None:
                return
            how = exit_reason(code)
            log.error("fine-tuning worker %d (pid %d) %s", slot.index, process.pid, how)
            message = (
                f"the fine-tuning worker (pid {process.pid}) {how} while running this job; "
                f"its log is {self.log_dir / f'fine-tuning-worker-{slot.index}.log'}"
            )
            failed = await anyio.to_thread.run_sync(self.jobs.fail_worker, worker_name(process.pid), message)
            for job_id in failed:
                log.error("job %s failed: %s", job_id, message)
            slot.process = None
            lived = time.monotonic() - slot.started
            slot.failures = 0 if lived > MAX_RESTART_DELAY_S else slot.failures + 1
            slot.restart_at = time.monotonic() + min(MAX_RESTART_DELAY_S, 2.0**slot.failures - 1)
        if time.monotonic() >= slot.restart_at:
            await anyio.to_thread.run_sync(self._spawn, slot)

    async def stop(self, timeout_s: float) -> None:
        """SIGTERM every worker (a running job goes back to the queue at its next step); SIGKILL after ``timeout_s``."""
        running = [s for s in self._slots if s.process is not None and s.process.poll() is None]
        for slot in running:
            assert slot.process is not None
            slot.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for slot in running:
            assert slot.process is not None
            try:
                await anyio.to_thread.run_sync(slot.process.wait, max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                slot.process.kill()
                await anyio.to_thread.run_sync(slot.process.wait)
                message = f"the fine-tuning worker (pid {slot.process.pid}) did not stop within {timeout_s:.0f} s"
                await anyio.to_thread.run_sync(self.jobs.fail_worker, worker_name(slot.process.pid), message)
        for slot in self._slots:
            if slot.log_file is not None:
                slot.log_file.close()
                slot.log_file = None
