"""`quiver merge` and `quiver deploy` as a user runs them, on a tiny base model that merges in a second.

The real model, and a real vLLM serving the merged model, are in tests/integration/test_merge.py.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from adapters import BaseModelSpec, DeploymentStore, Registry
from adapters import merge as merging
from adapters.catalog import MERGE_FILE
from quiver.cli import app
from tests import factories

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run(args: list[str], data_dir: Path, base: Path) -> tuple[int, str]:
    env = {"QUIVER_DATA_DIR": str(data_dir), "QUIVER_BASE_MODEL_PATH": str(base), "QUIVER_BASE_MODEL": "tiny"}
    result = CliRunner().invoke(app, args, env=env)
    return result.exit_code, " ".join(result.output.split())  # as read, whatever rich wrapped


def open_registry(data_dir: Path, base: Path) -> Registry:
    spec = BaseModelSpec.from_model_dir(base, "tiny")
    return Registry.open(f"sqlite:///{data_dir / 'registry.db'}", data_dir / "adapters", base=spec)


@pytest.fixture
def pushed(tiny_base: Path, tmp_path: Path) -> Path:
    """A data dir whose registry holds bot@v1, a LoRA adapter of the tiny base that changes its output."""
    adapter = factories.make_lora_adapter(tiny_base, tmp_path / "adapter", seed=1, scale=0.5)
    data = tmp_path / "data"
    code, output = run(["adapters", "push", str(adapter), "--name", "bot"], data, tiny_base)
    assert code == 0, output
    return data


def test_quiver_merge_saves_a_complete_model_and_records_the_check(pushed: Path, tiny_base: Path) -> None:
    code, output = run(["merge", "bot@v1"], pushed, tiny_base)
    assert code == 0, output
    assert "bot@v1 merged (float32) vs base + adapter: equivalent" in output
    merged = pushed / "merged" / "bot@v1"
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", MERGE_FILE} <= {
        p.name for p in merged.iterdir()
    }
    assert [p.name for p in merged.parent.iterdir()] == ["bot@v1"]  # no staging left behind
    with open_registry(pushed, tiny_base) as registry:
        version = registry.resolve("bot@v1")
        merge = DeploymentStore.beside(registry).latest_merge("bot", 1)
    assert merge is not None and merge.equivalent and merge.path == merged
    assert merge.report["dtype"] == "float32" and merge.report["max_logprob_diff"] < 1e-3
    assert [p["prompt"] for p in merge.report["prompts"]] == list(merging.GOLDEN_PROMPTS)
    assert all(p["identical"] for p in merge.report["prompts"])
    assert json.loads((merged / MERGE_FILE).read_text())["adapter_sha256"] == version.sha256

    # The merged weight is W + (alpha / r) B A; layers the adapter does not touch are the base's own.
    weights, base = load_file(merged / "model.safetensors"), load_file(tiny_base / "model.safetensors")
    lora = load_file(version.path / "adapter_model.safetensors")
    a = lora["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = lora["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(weights[q_proj], base[q_proj])
    torch.testing.assert_close(weights[q_proj], base[q_proj] + 16 / 8 * b @ a)
    k_proj = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(weights[k_proj], base[k_proj])

    # Merging again replaces the directory in one rename, and records a second merge.
    code, output = run(["merge", "bot@v1"], pushed, tiny_base)
    assert code == 0, output
    assert [p.name for p in merged.parent.iterdir()] == ["bot@v1"]
    with open_registry(pushed, tiny_base) as registry:
        assert len(DeploymentStore.beside(registry).merges("bot", 1)) == 2


def test_a_merge_that_is_not_equivalent_is_neither_saved_nor_recorded(
    pushed: Path, tiny_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(merging.LOGPROB_TOLERANCE, torch.float32, -1.0)  # a tolerance no merge can meet
    code, output = run(["merge", "bot@v1", "--output", str(pushed / "out")], pushed, tiny_base)
    assert code == 1
    assert "NOT equivalent" in output and "nothing saved or recorded" in output
    assert [p.name for p in pushed.iterdir() if p.name == "out" or p.name.startswith(".out")] == []
    with open_registry(pushed, tiny_base) as registry:
        assert DeploymentStore.beside(registry).merges("bot", 1) == []

    code, output = run(["merge", "bot@v1", "--output", str(pushed / "out"), "--force"], pushed, tiny_base)
    assert code == 0, output
    assert "NOT equivalent" in output and (pushed / "out" / "config.json").is_file()
    with open_registry(pushed, tiny_base) as registry:
        merge = DeploymentStore.beside(registry).latest_merge("bot", 1)
        assert merge is not None and not merge.equivalent
    code, output = run(["deploy", "merged", "bot@v1"], pushed, tiny_base)
    assert code == 1 and "was not equivalent" in output


def test_a_corrupted_merged_weight_is_not_equivalent(pushed: Path, tiny_base: Path, tmp_path: Path) -> None:
    with open_registry(pushed, tiny_base) as registry:
        version = registry.resolve("bot@v1")
    report = merging.merge_version(version, tiny_base, tmp_path / "merged")
    assert report.saved and report.equivalent
    corrupted = tmp_path / "corrupted"
    shutil.copytree(report.path, corrupted)
    weights = corrupted / "model.safetensors"
    weights.chmod(0o644)
    tensors = load_file(weights)
    tensors["model.layers.1.mlp.down_proj.weight"] *= 1.2
    save_file(tensors, weights, metadata={"format": "pt"})
    check = merging.check_equivalence(tiny_base, version.path, corrupted)
    assert not check.equivalent
    assert check.max_logprob_diff > merging.LOGPROB_TOLERANCE[torch.float32]
    assert merging.check_equivalence(tiny_base, version.path, report.path).equivalent


def test_merged_prompts_come_from_the_prompts_file(pushed: Path, tiny_base: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello there!\n\nWhat is 2 + 2?\n")
    code, output = run(["merge", "bot@v1", "--prompts", str(prompts)], pushed, tiny_base)
    assert code == 0, output
    with open_registry(pushed, tiny_base) as registry:
        merge = DeploymentStore.beside(registry).latest_merge("bot", 1)
    assert merge is not None
    assert [p["prompt"] for p in merge.report["prompts"]] == ["Hello there!", "What is 2 + 2?"]


def test_deploy_merged_refuses_a_version_that_was_never_merged(pushed: Path, tiny_base: Path) -> None:
    code, output = run(["deploy", "merged", "bot@v1"], pushed, tiny_base)
    assert code == 1
    assert "bot@v1 has not been merged; run `quiver merge bot@v1` first" in output


class _OneModel(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"object": "list", "data": [{"id": "merged-bot", "object": "model"}]}).encode()
        self.send_response(200 if self.path == "/v1/models" else 404)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def model_server() -> Iterator[str]:
    """An OpenAI-shaped server that lists one model, as a merged deployment on Kubernetes would."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _OneModel)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_deploy_by_url_registers_a_running_server_and_rm_unregisters_it(
    pushed: Path, tiny_base: Path, model_server: str
) -> None:
    code, output = run(["deploy", "merged", "bot@v1", "--url", model_server], pushed, tiny_base)
    assert code == 0, output
    with open_registry(pushed, tiny_base) as registry:
        [deployment] = DeploymentStore.beside(registry).deployments()
        assert (deployment.lora_name, deployment.url, deployment.served_model, deployment.pid) == (
            "bot@v1",
            model_server,
            "merged-bot",  # the one model it serves
            None,
        )
    code, output = run(["deploy", "list"], pushed, tiny_base)
    assert code == 0 and "bot@v1" in output and "merged-bot" in output

    code, output = run(["deploy", "merged", "bot@v1", "--url", model_server], pushed, tiny_base)
    assert code == 1 and "bot@v1 is already deployed at" in output
    code, output = run(["adapters", "rm", "bot", "--version", "1"], pushed, tiny_base)
    assert code == 1 and "quiver deploy rm bot@v1" in output

    code, output = run(["deploy", "rm", "bot@v1"], pushed, tiny_base)
    assert code == 0, output
    assert "removed the deployment of bot@v1" in output and "stopped" not in output
    with open_registry(pushed, tiny_base) as registry:
        assert DeploymentStore.beside(registry).deployments() == []
    code, output = run(["deploy", "rm", "bot@v1"], pushed, tiny_base)
    assert code == 1 and "bot@v1 is not deployed" in output


def test_deploy_by_url_refuses_a_server_that_does_not_serve_the_model(
    pushed: Path, tiny_base: Path, model_server: str
) -> None:
    args = ["deploy", "merged", "bot@v1", "--url", model_server, "--served-model", "other"]
    code, output = run(args, pushed, tiny_base)
    assert code == 1 and "serves merged-bot, not other" in output
    code, output = run(["deploy", "merged", "bot@v1", "--url", "http://127.0.0.1:9"], pushed, tiny_base)
    assert code == 1 and "did not list models" in output


def test_deploy_merged_refuses_a_port_in_use_before_starting_vllm(
    pushed: Path, tiny_base: Path, model_server: str
) -> None:
    code, output = run(["merge", "bot@v1"], pushed, tiny_base)
    assert code == 0, output
    port = model_server.rsplit(":", 1)[1]
    code, output = run(["deploy", "merged", "bot@v1", "--port", port], pushed, tiny_base)
    assert code == 1 and f"port {port} on 127.0.0.1 is already in use; pick another with --port" in output
    assert not (pushed / "logs").exists()  # no vLLM was started
