"""The process launcher (``core.processes``) with real, tiny child processes: ready, failed, stopped."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from core import processes
from core.errors import ProcessFailed
from core.processes import free_port, healthy, port_in_use
from tests.servers import wait_until

WHAT = "the test server"


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def logged(process: processes.ChildProcess, text: str) -> None:
    """Wait until the process has written ``text`` to its log (a handler installed, a pid printed)."""
    process.wait_ready(lambda: text in process.log_tail(), 30, condition=f"{text!r} in its log")


def test_a_server_is_ready_once_it_answers_and_stopped_when_the_block_ends(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    args = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(tmp_path)]
    with processes.serving(WHAT, args, tmp_path / "server.log", url, timeout_s=30) as server:
        assert healthy(url)
        assert server.exit_code() is None
    assert server.exit_code() == -signal.SIGTERM
    assert not port_in_use("127.0.0.1", port)


def test_a_process_that_exits_early_is_named_with_its_code_log_and_tail(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "server.log"
    crashing = python("import sys; print('no model at /nowhere'); sys.exit(3)")
    with pytest.raises(ProcessFailed) as failed:
        with processes.serving(WHAT, crashing, log, f"http://127.0.0.1:{free_port()}/health", timeout_s=60):
            pytest.fail("a process that exited is not ready")
    message = str(failed.value)
    assert message.startswith(f"{WHAT} exited with code 3 before it was ready")
    assert str(log) in message and message.endswith("no model at /nowhere")


def test_a_process_that_never_answers_times_out_naming_itself_and_its_log(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    url = f"http://127.0.0.1:{free_port()}/health"
    process = processes.start(WHAT, python("import time; print('loading weights', flush=True); time.sleep(60)"), log)
    try:
        logged(process, "loading weights")
        with pytest.raises(ProcessFailed) as failed:
            process.wait_healthy(url, timeout_s=0.5)
    finally:
        process.stop(grace_s=5)
    message = str(failed.value)
    assert message.startswith(f"{WHAT} was not ready (GET {url} answering 200) after")
    assert str(log) in message and message.endswith("loading weights")


def test_stop_sends_sigterm_and_kills_a_process_that_ignores_it(tmp_path: Path) -> None:
    stubborn = python(
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: print('ignoring SIGTERM', flush=True))\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    process = processes.start(WHAT, stubborn, tmp_path / "server.log")
    logged(process, "ready")
    assert process.stop(grace_s=0.5) == -signal.SIGKILL
    assert "ignoring SIGTERM" in process.log_tail()


def test_stop_reaches_what_the_process_started(tmp_path: Path) -> None:
    process = processes.start(WHAT, ["sh", "-c", "sleep 60 & echo child $!; wait"], tmp_path / "server.log")
    logged(process, "child ")
    child = int(process.log_tail().split("child ")[1].split()[0])
    assert processes.alive(child)
    process.stop(grace_s=5)
    wait_until(lambda: not processes.alive(child), timeout_s=10, what="the child to be stopped with its parent")


def test_stop_after_exit_gives_the_exit_code(tmp_path: Path) -> None:
    process = processes.start(WHAT, python("raise SystemExit(4)"), tmp_path / "server.log")
    assert process.wait(30) == 4
    assert process.stop() == 4


@pytest.mark.parametrize("detach", [False, True])
def test_a_process_dies_with_its_parent_unless_detached(tmp_path: Path, detach: bool) -> None:
    # A supervisor (this parent) killed by SIGKILL cannot stop what it started: only detached ones outlive it.
    parent = processes.start(
        "the supervisor",
        python(
            "import sys, time\n"
            "from pathlib import Path\n"
            "from core import processes\n"
            f"child = processes.start('sleeper', [sys.executable, '-c', 'import time; time.sleep(60)'], "
            f"Path({str(tmp_path / 'child.log')!r}), detach={detach})\n"
            "print('child', child.pid, flush=True)\n"
            "time.sleep(60)\n"
        ),
        tmp_path / "parent.log",
        env={"PYTHONPATH": str(Path(processes.__file__).parents[1])},
    )
    try:
        logged(parent, "child ")
        child = int(parent.log_tail().split("child ")[1].split()[0])
    finally:
        parent.stop(steps=())
    if detach:
        assert processes.alive(child)
        processes.stop_detached(child, grace_s=5)
        assert not processes.alive(child)
    else:
        wait_until(lambda: not processes.alive(child), timeout_s=10, what="the child to die with its parent")


def test_a_stat_line_is_split_after_the_command_name_whatever_it_holds() -> None:
    # A command name may hold spaces and parentheses: only the last ")" ends it.
    line = (
        "4242 (a) b (c)) S 1 4242 4242 0 -1 4194560 120 0 0 0 250 75 0 0 20 0 3 0 100 123456 2048 18446744073709551615"
    )
    fields = processes.stat_fields(line)
    assert fields[0] == "S" and (fields[11], fields[12]) == ("250", "75") and fields[21] == "2048"


def test_cpu_time_is_counted_for_a_process_that_spins(tmp_path: Path) -> None:
    process = processes.start(WHAT, python("while True: pass"), tmp_path / "spin.log")
    try:
        process.wait_ready(lambda: processes.cpu_seconds(process.pid) >= 0.2, 60, condition="0.2 s of CPU used")
    finally:
        process.stop(grace_s=5)
    with pytest.raises(ProcessLookupError):
        processes.cpu_seconds(process.pid)


def test_resident_memory_counts_the_pages_a_process_wrote(tmp_path: Path) -> None:
    code = "import time; block = b'x' * (96 << 20); print('written', flush=True); time.sleep(60)"
    process = processes.start(WHAT, python(code), tmp_path / "memory.log")
    try:
        logged(process, "written")
        assert processes.rss_bytes(process.pid) >= 96 << 20
    finally:
        process.stop(grace_s=5)
