"""How a fine-tuning worker process is configured: the contract between whoever starts workers and the worker.

The gateway starts workers as ``python -m training.worker`` with ``WorkerConfig.args()``; the worker reads
them back with ``parse_args``. Both sides import this module, so neither imports the other.
"""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

WORKER_MODULE = "training.worker"
WORKER_DESCRIPTION = "The fine-tuning worker: claims queued jobs from the database one at a time and trains them."


@dataclass(frozen=True)
class WorkerConfig:
    """Where a worker finds the jobs, the files, the registry and the base model, and how often it looks."""

    database_url: str
    data_dir: Path
    store_dir: Path
    base_model_path: Path
    max_lora_rank: int = 16
    poll_s: float = 1.0
    heartbeat_s: float = 2.0
    stale_after_s: float = 60.0
    # Set for workers a gateway starts: they run in their own session, so a gateway that dies without
    # stopping them (SIGKILL) would otherwise leave them behind, and its successor would start more.
    exit_with_parent: bool = False

    def args(self) -> list[str]:
        """The command-line arguments that give a worker process this config (not the database URL)."""
        return [
            "--data-dir",
            str(self.data_dir),
            "--store-dir",
            str(self.store_dir),
            "--base-model-path",
            str(self.base_model_path),
            "--max-lora-rank",
            str(self.max_lora_rank),
            "--poll-s",
            str(self.poll_s),
            "--heartbeat-s",
            str(self.heartbeat_s),
            "--stale-after-s",
            str(self.stale_after_s),
            *(["--exit-with-parent"] if self.exit_with_parent else []),
        ]


def worker_name(pid: int) -> str:
    """How jobs name the worker process ``pid`` on this machine: ``host:pid``."""
    return f"{socket.gethostname()}:{pid}"


def parse_args(argv: Sequence[str] | None = None) -> WorkerConfig:
    """The worker's config from its command line (and ``QUIVER_DATABASE_URL``)."""
    parser = argparse.ArgumentParser(prog=f"python -m {WORKER_MODULE}", description=WORKER_DESCRIPTION)
    parser.add_argument("--data-dir", type=Path, required=True, help="The gateway's data dir (files, job runs).")
    parser.add_argument("--store-dir", type=Path, required=True, help="The registry's adapter store.")
    parser.add_argument("--base-model-path", type=Path, required=True, help="The served base model's directory.")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("QUIVER_DATABASE_URL"),
        help="SQLAlchemy URL of the registry database (default: $QUIVER_DATABASE_URL).",
    )
    parser.add_argument("--max-lora-rank", type=int, default=16, help="vLLM's --max-lora-rank.")
    parser.add_argument("--poll-s", type=float, default=1.0, help="How often an idle worker looks for jobs.")
    parser.add_argument("--heartbeat-s", type=float, default=2.0, help="How often a running job reports.")
    parser.add_argument(
        "--stale-after-s", type=float, default=60.0, help="A running job silent this long has lost its worker."
    )
    parser.add_argument(
        "--exit-with-parent", action="store_true", help="Stop (as on SIGTERM) when the process that started it dies."
    )
    args = parser.parse_args(argv)
    if not args.database_url:
        parser.error("give --database-url or set QUIVER_DATABASE_URL")
    return WorkerConfig(
        database_url=args.database_url,
        data_dir=args.data_dir,
        store_dir=args.store_dir,
        base_model_path=args.base_model_path,
        max_lora_rank=args.max_lora_rank,
        poll_s=args.poll_s,
        heartbeat_s=args.heartbeat_s,
        stale_after_s=args.stale_after_s,
        exit_with_parent=args.exit_with_parent,
    )
