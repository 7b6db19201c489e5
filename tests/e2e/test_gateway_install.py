"""The gateway-only install: a venv with the base dependencies alone serves through ``quiver up --vllm-url``.

No torch there: the gateway in front of an instant OpenAI-shaped upstream lists models, answers a chat completion,
validates and serves an uploaded adapter, routes ``auto`` and answers from a RAG collection (its embedder runs on
what the gateway install has), and refuses a fine-tuning job naming the extra it lacks; the commands that need the
ML stack say which extra, without a traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from core import processes
from core.processes import free_port
from loadtest import instant_upstream
from tests.integration.openai_helpers import error_of, push
from tests.integration.test_rag_path import HANDBOOK
from tests.lean_install import LeanInstall, install
from tests.servers import wait_until

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class LeanGateway:
    """The lean install's gateway process: its URL, process id and data dir."""

    url: str
    pid: int
    data_dir: Path


@pytest.fixture(scope="module")
def lean(tmp_path_factory: pytest.TempPathFactory) -> LeanInstall:
    return install(tmp_path_factory.mktemp("lean"))


@pytest.fixture(scope="module")
def lean_gateway(
    lean: LeanInstall, base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LeanGateway]:
    """``quiver up`` of the lean install in front of the instant upstream, with the embedded model's tokenizer."""
    work = tmp_path_factory.mktemp("lean-gateway")
    with ExitStack() as stack:
        upstream = instant_upstream.start(stack, work)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = lean.environment(QUIVER_DATA_DIR=str(work / "data"), QUIVER_BASE_MODEL_PATH=str(base_model_dir))
        command = [str(lean.quiver), "up", "--vllm-url", upstream, "--port", str(port)]
        gateway = stack.enter_context(processes.serving("the lean gateway", command, work / "up.log", f"{url}/health",
                                                        env=env, timeout_s=120))  # fmt: skip
        yield LeanGateway(url, gateway.pid, work / "data")


def run(lean: LeanInstall, args: list[str], **settings: str) -> subprocess.CompletedProcess[str]:
    """A command of the lean install, with these ``QUIVER_*`` settings."""
    env = lean.environment(**settings)
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=120, cwd=lean.site)


def said(done: subprocess.CompletedProcess[str]) -> str:
    """What a command printed, its lines as the terminal wrapped them joined again."""
    return " ".join((done.stdout + done.stderr).split())


def test_the_install_has_no_ml_stack_and_imports_the_gateway(lean: LeanInstall) -> None:
    torch = run(lean, [str(lean.python), "-c", "import torch"])
    assert torch.returncode == 1 and "No module named 'torch'" in torch.stderr
    probe = "import json, sys, gateway.app, quiver.cli; print(json.dumps([gateway.app.__file__, sorted(sys.modules)]))"
    imported = run(lean, [str(lean.python), "-c", probe])
    assert imported.returncode == 0, imported.stderr
    path, modules = json.loads(imported.stdout)
    assert path.startswith(str(lean.site)), "the installed gateway, not this checkout"
    assert not {"torch", "transformers", "peft", "trl", "sentence_transformers"} & set(modules)


def test_the_lean_gateway_lists_models_and_answers(lean_gateway: LeanGateway) -> None:
    models = httpx.get(f"{lean_gateway.url}/v1/models")
    assert models.status_code == 200, models.text
    assert {"instant", "base"} <= {m["id"] for m in models.json()["data"]}
    question = {"model": "base", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 4}
    answer = httpx.post(f"{lean_gateway.url}/v1/chat/completions", json=question, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == "ok"
    assert answer.headers["x-quiver-served-by"] == "instant"
    maps = Path(f"/proc/{lean_gateway.pid}/maps").read_text()
    assert "libtorch" not in maps


def test_the_lean_gateway_validates_and_serves_an_adapter(
    lean_gateway: LeanGateway, lora_dirs: tuple[Path, ...], base_model_dir: Path
) -> None:
    pushed = push(lean_gateway.url, "lean", lora_dirs[0])
    assert pushed.status_code == 201, pushed.text
    question = {"model": "lean", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 4}
    answer = httpx.post(f"{lean_gateway.url}/v1/chat/completions", json=question, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-quiver-served-by"] == "lean@v1"


def test_the_lean_gateway_routes_auto(lean_gateway: LeanGateway, lora_dirs: tuple[Path, ...]) -> None:
    """The embedder runs in the gateway-only install (from the export `quiver model prepare` made)."""
    # A description alone scores 0.24 against the question, under the default threshold (0.35): examples too.
    for name, directory, description, examples in (
        ("lean-recipes", lora_dirs[1], "Cooking recipes and kitchen questions", ["How long do I boil an egg?"]),
        ("lean-invoices", lora_dirs[2], "Billing, invoices and refunds", ["I was charged twice"]),
    ):
        assert push(lean_gateway.url, name, directory).status_code == 201
        routing = {"description": description, "examples": examples}
        patched = httpx.patch(f"{lean_gateway.url}/v1/adapters/{name}", json=routing)
        assert patched.status_code == 200, patched.text
    question = [{"role": "user", "content": "How long should I boil rice?"}]
    auto = httpx.post(f"{lean_gateway.url}/v1/chat/completions", json={"model": "auto", "messages": question})
    assert auto.status_code == 200, auto.text
    assert auto.headers["x-quiver-served-by"] == "lean-recipes@v1"


def test_the_lean_gateway_answers_from_a_rag_collection(lean_gateway: LeanGateway, tmp_path: Path) -> None:
    files = []
    for name, text in HANDBOOK.items():
        (tmp_path / name).write_text(text)
        files.append(str(tmp_path / name))
    # Ingested by the full install's CLI into the lean gateway's data dir; the gateway embeds the questions.
    ingest = [sys.executable, "-m", "quiver.cli", "rag", "ingest", "handbook", *files]
    done = subprocess.run(ingest, env=dict(os.environ, QUIVER_DATA_DIR=str(lean_gateway.data_dir)),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    wait_until(
        lambda: "rag:handbook" in {m["id"] for m in httpx.get(f"{lean_gateway.url}/v1/models").json()["data"]},
        timeout_s=30,
        what="the lean gateway to list the collection",
    )
    question = [{"role": "user", "content": "How do I reset my Nimbus router?"}]
    rag = httpx.post(f"{lean_gateway.url}/v1/chat/completions", json={"model": "rag:handbook", "messages": question})
    assert rag.status_code == 200, rag.text
    assert json.loads(rag.headers["x-quiver-sources"])[0]["source"] == "router.md"


def test_the_lean_gateway_refuses_fine_tuning_naming_the_extra(lean_gateway: LeanGateway) -> None:
    job = {"model": "base", "training_file": "file-abc"}
    refused = httpx.post(f"{lean_gateway.url}/v1/fine_tuning/jobs", json=job, timeout=30)
    assert refused.status_code == 501
    error = error_of(refused)
    assert error["code"] == "fine_tuning_not_installed"
    assert "`training` extra" in error["message"] and "QUIVER_FINE_TUNING_WORKERS=0" in error["message"]
    assert httpx.get(f"{lean_gateway.url}/v1/fine_tuning/jobs").json()["data"] == []


def test_commands_that_need_the_ml_stack_name_the_extra(lean: LeanInstall, tmp_path: Path) -> None:
    empty = {"QUIVER_CACHE_DIR": str(tmp_path / "cache"), "QUIVER_DATA_DIR": str(tmp_path / "data")}
    prepare = run(lean, [str(lean.quiver), "model", "prepare"], **empty)
    assert prepare.returncode == 1
    assert said(prepare).startswith("error (not_installed): converting the embedded model into ")
    assert "needs the `ml` extra" in said(prepare) and "pip install 'quiver[ml]'" in said(prepare)
    up = run(lean, [str(lean.quiver), "up", "--port", str(free_port())], **empty)
    assert up.returncode == 1
    assert "`quiver up` without --vllm-url (it starts vLLM) needs vLLM" in said(up) and "'quiver[cpu]'" in said(up)
    merge = run(lean, [str(lean.quiver), "merge", "x@v1"], **empty)
    assert merge.returncode == 1 and "quiver merge needs the `ml` extra" in said(merge)
    for done in (prepare, up, merge):
        assert "Traceback" not in said(done)
    assert not (tmp_path / "cache" / "downloads").exists(), "nothing was downloaded for a conversion it cannot do"
