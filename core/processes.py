"""Starting a child process with its output in a log file, waiting until it answers, stopping it.

The one launcher for every process Quiver starts and then talks to: vLLM, gateways (``quiver up``), locust,
the benchmarks' helper servers and the tests' fixtures. Each process leads a process group of its own, so a
stop reaches whatever it started too, and a terminal's Ctrl-C reaches only the supervisor, which stops it in
order. A failure to come up raises ``ProcessFailed`` naming the process and its log, with the log's end.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx

from core import threads
from core.errors import ProcessFailed

_PR_SET_PDEATHSIG = 1
# How long a process gets to exit after SIGKILL before a stop gives up waiting for it.
_KILL_WAIT_S = 10.0


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


def healthy(url: str, timeout_s: float = 2.0) -> bool:
    """Whether ``GET url`` answers 200 now."""
    try:
        return httpx.get(url, timeout=timeout_s).status_code == 200
    except httpx.TransportError:
        return False


def log_tail(log_path: Path, lines: int = 30) -> str:
    """The end of a log, for error messages ("" when there is none)."""
    try:
        return "\n".join(log_path.read_text("utf-8", "replace").splitlines()[-lines:])
    except OSError:
        return ""


def last_log_line(log_path: Path) -> str:
    """The last non-empty line of a log, for progress displays ("" when there is none)."""
    try:
        with log_path.open("rb") as f:
            f.seek(max(0, log_path.stat().st_size - 4096))
            lines = [ln for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
        return lines[-1][-160:] if lines else ""
    except OSError:
        return ""


class ChildProcess:
    """A process ``start`` launched: wait until it is ready, wait for its exit, stop it.

    ``what`` names it in error messages ("vLLM", "the gateway", "locust").
    """

    def __init__(self, what: str, popen: subprocess.Popen[bytes], log_path: Path) -> None:
        self.what = what
        self.log_path = log_path
        self._popen = popen

    @property
    def pid(self) -> int:
        """The process id, which also names its process group."""
        return self._popen.pid

    def exit_code(self) -> int | None:
        """Its exit code once it has exited (negative: the signal that ended it), else None."""
        return self._popen.poll()

    def wait(self, timeout_s: float | None = None) -> int | None:
        """Its exit code once it exits; None when it still runs after ``timeout_s``."""
        try:
            return self._popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def log_tail(self, lines: int = 30) -> str:
        """The end of its log."""
        return log_tail(self.log_path, lines)

    def wait_ready(
        self,
        ready: Callable[[], bool],
        timeout_s: float,
        *,
        condition: str = "ready",
        on_wait: Callable[[str], None] | None = None,
        interval_s: float = 0.25,
    ) -> None:
        """Poll ``ready()`` until true; ProcessFailed if the process exits first or ``timeout_s`` passes.

        ``condition`` says what ready means, for the message; ``on_wait`` gets the log's last line between polls.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            code = self.exit_code()
            if code is not None:
                raise self._failed(f"exited with code {code} before it was ready ({condition})")
            if ready():
                return
            if time.monotonic() >= deadline:
                raise self._failed(f"was not ready ({condition}) after {timeout_s:g} s")
            if on_wait is not None:
                on_wait(last_log_line(self.log_path))
            time.sleep(interval_s)

    def wait_healthy(self, url: str, timeout_s: float = 300.0, *, on_wait: Callable[[str], None] | None = None) -> None:
        """Until ``GET url`` (its health check) answers 200; ProcessFailed if it exits first or times out."""
        self.wait_ready(lambda: healthy(url), timeout_s, condition=f"GET {url} answering 200", on_wait=on_wait)

    def _failed(self, how: str) -> ProcessFailed:
        tail = self.log_tail()
        where = f"its log {self.log_path}" + (f" ends:\n{tail}" if tail else " is empty")
        return ProcessFailed(f"{self.what} {how}; {where}")

    def stop(self, grace_s: float = 20.0, *, steps: Sequence[tuple[signal.Signals, float]] | None = None) -> int | None:
        """SIGTERM its process group, SIGKILL after ``grace_s``; its exit code (None if even SIGKILL did not end it).

        ``steps``: other (signal, seconds to wait) to send in turn before SIGKILL, e.g. SIGINT first.
        """
        if self.exit_code() is None:
            steps = ((signal.SIGTERM, grace_s),) if steps is None else steps
            _stop_group(self.pid, lambda wait_s: self.wait(wait_s) is not None, steps)
        else:  # what it started may have outlived it in its group
            _signal_group(self.pid, signal.SIGKILL)
        return self.exit_code()


def start(
    what: str,
    args: Sequence[str],
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    detach: bool = False,
    append: bool = True,
) -> ChildProcess:
    """Launch ``args`` in a process group of its own, stdout and stderr to ``log_path`` (appended to, unless not
    ``append``), stdin empty; ``env`` is set on top of this process's environment, less the thread caps a gateway
    process set for itself (``core.threads``).

    Unless ``detach``, the process gets SIGTERM when the one that started it dies (even by SIGKILL), so no server
    outlives its supervisor; a detached one outlives it (a merged deployment outlives the CLI).
    Linux sends that SIGTERM when the starting *thread* ends: start long-lived processes from a thread that lives as
    long as they should (the gateway's fine-tuning workers, started from worker threads, watch their parent instead).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab" if append else "wb") as log:
        popen = subprocess.Popen(
            list(args),
            env=threads.uncapped({**os.environ, **(env or {})}),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=None if detach else _dies_with(os.getpid()),
        )
    return ChildProcess(what, popen, log_path)


@contextmanager
def serving(
    what: str,
    args: Sequence[str],
    log_path: Path,
    health_url: str,
    *,
    env: Mapping[str, str] | None = None,
    timeout_s: float = 600.0,
    grace_s: float = 30.0,
) -> Iterator[ChildProcess]:
    """``start`` a server and wait until ``health_url`` answers 200; it is stopped when the block ends."""
    process = start(what, args, log_path, env=env)
    try:
        process.wait_healthy(health_url, timeout_s)
        yield process
    finally:
        process.stop(grace_s)


def _dies_with(parent: int) -> Callable[[], None]:
    """What the child runs before its program: ask for SIGTERM when ``parent`` dies."""
    try:
        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except OSError:  # not Linux: the child may outlive a supervisor killed without a chance to stop it
        return lambda: None

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the request took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


def _stop_group(pid: int, exited: Callable[[float], bool], steps: Sequence[tuple[signal.Signals, float]]) -> None:
    """Send each signal of ``steps`` to the process group led by ``pid``, then SIGKILL, until ``exited(seconds)``,
    which waits up to that long, says the leader is gone."""
    for sig, wait_s in (*steps, (signal.SIGKILL, _KILL_WAIT_S)):
        if not _signal_group(pid, sig) or exited(wait_s):
            return


def _signal_group(pid: int, sig: signal.Signals) -> bool:
    """Whether the group led by ``pid`` was there to signal."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def stop_detached(pid: int, grace_s: float = 20.0) -> None:
    """Stop a process started with ``detach=True`` by an earlier process, which cannot ``wait`` for it:
    SIGTERM its group, SIGKILL after ``grace_s``."""

    def exited(timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and alive(pid):
            time.sleep(0.2)
        return not alive(pid)

    _stop_group(pid, exited, ((signal.SIGTERM, grace_s),))


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie, dead but not yet reaped by its parent, is not)."""
    try:
        state = stat_fields(Path(f"/proc/{pid}/stat").read_text())[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def stat_fields(line: str) -> list[str]:
    """The fields of a ``/proc/<pid>/stat`` line after the command name, which may hold spaces and parentheses:
    ``[0]`` is the state (field 3 in proc(5)), ``[11]`` and ``[12]`` user and system CPU ticks, ``[21]`` RSS pages."""
    return line.rpartition(")")[2].split()


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time that ``pid`` has used so far, all its threads (not its children); from /proc."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """The resident memory of ``pid`` now, from /proc."""
    return int(_stat(pid)[21]) * os.sysconf("SC_PAGE_SIZE")


def _stat(pid: int) -> list[str]:
    try:
        return stat_fields(Path(f"/proc/{pid}/stat").read_text())
    except FileNotFoundError:
        raise ProcessLookupError(f"no process {pid}") from None


def command_line(pid: int) -> list[str]:
    """The arguments ``pid`` runs with (an empty list when it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode("utf-8", "replace").split("\0")
    except OSError:
        return []
