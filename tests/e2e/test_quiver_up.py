"""Real processes: `quiver up` in front of the session's vLLM, the CLI, the official client, Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from core import processes
from core.processes import free_port, healthy, port_in_use
from tests.integration.openai_helpers import QUESTION, client, greedy
from tests.servers import wait_until


def quiver(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "quiver.cli", *args], env=env, capture_output=True, text=True, timeout=300
    )


def test_up_starts_vllm_serves_pushes_and_stops_both_on_ctrl_c(
    base_model_dir: Path, lora_dirs: tuple[Path, ...], tmp_path: Path
) -> None:
    """What `make up` runs: quiver up with its own vLLM on the embedded model."""
    port, vllm_port = free_port(), free_port()
    env = dict(os.environ, QUIVER_DATA_DIR=str(tmp_path / "data"))
    command = [sys.executable, "-m", "quiver.cli", "up", "--port", str(port), "--vllm-port", str(vllm_port)]
    up = processes.start("quiver up", command, tmp_path / "up.log", env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        up.wait_healthy(f"{url}/health", timeout_s=600)
        assert port_in_use("127.0.0.1", vllm_port)
        assert "base" in {m.id for m in client(url).models.list()}

        name = f"e2e{port}"
        pushed = quiver("adapters", "push", str(lora_dirs[0]), "--name", name, env=env)
        assert pushed.returncode == 0, pushed.stderr
        assert f"{name}@v1" in pushed.stdout
        assert quiver("adapters", "push", str(lora_dirs[1]), "--name", name, env=env).returncode == 0
        # The CLI wrote to the registry directly; the gateway sees it without a restart.
        wait_until(
            lambda: httpx.get(f"{url}/v1/models/{name}@v2").status_code == 200,
            timeout_s=30,
            what="the gateway to see the CLI's push",
        )
        v1, _ = greedy(url, f"{name}@v1")
        _, headers = greedy(url, name)
        assert headers["x-quiver-served-by"] == f"{name}@v2"

        aliased = quiver("adapters", "alias", name, "prod", "1", "--force", env=env)
        assert aliased.returncode == 0, aliased.stderr
        wait_until(
            lambda: greedy(url, name, max_tokens=1)[1]["x-quiver-served-by"] == f"{name}@v1",
            timeout_s=30,
            what="the alias move to reach the gateway",
        )
        assert greedy(url, name)[0] == v1

        listed = quiver("adapters", "list", env=env)
        assert "prod" in listed.stdout and "v2" in listed.stdout
        refused = quiver("adapters", "rm", name, "--version", "1", env=env)
        assert refused.returncode == 1 and "prod" in refused.stderr

        # The load tests run against what `make up` serves, headless, with their reports.
        out = tmp_path / "loadtest"
        loaded = quiver("loadtest", "--scenario", "adapter", "--host", url, "--users", "2", "--duration", "3s",
                        "--out", str(out), env=env)  # fmt: skip
        assert loaded.returncode == 0, loaded.stdout + loaded.stderr
        assert (out / "report.html").is_file() and (out / "locust_stats.csv").is_file()
        assert "Aggregated" in loaded.stdout

        streamed = client(url).chat.completions.create(model=name, messages=QUESTION, max_tokens=8, stream=True)  # type: ignore[arg-type]
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    finally:
        code = up.stop(steps=((signal.SIGINT, 60),))  # Ctrl-C
    output = (tmp_path / "up.log").read_text()
    assert code == 0, output
    assert "Quiver is serving" in output and f"localhost:{port}" in output
    assert "Stopped." in output
    assert not healthy(f"{url}/health")
    assert not port_in_use("127.0.0.1", vllm_port), "Ctrl-C stops vLLM too"


def test_up_explains_a_bad_vllm_url(tmp_path: Path) -> None:
    env = dict(os.environ, QUIVER_DATA_DIR=str(tmp_path / "data"))
    bad = quiver("up", "--vllm-url", "localhost:8001", "--port", str(free_port()), env=env)
    assert bad.returncode == 1
    assert "must start with http" in bad.stdout and "Traceback" not in bad.stdout + bad.stderr
    nothing = quiver("up", "--vllm-url", f"http://127.0.0.1:{free_port()}", "--port", str(free_port()), env=env)
    assert nothing.returncode == 1 and "could not ask vLLM" in nothing.stdout
