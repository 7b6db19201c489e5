"""`quiver eval` through a real gateway and vLLM, and the promotion gate that reads its report."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from typer.testing import CliRunner

from gateway import Settings
from quiver.cli import app
from tests.servers import GatewayServer
from training.demo import write_demo
from training.eval import BASELINES, SYSTEMS


def quiver(args: list[str], settings: Settings) -> tuple[int, str]:
    env = {
        "QUIVER_DATA_DIR": str(settings.data_dir),
        "QUIVER_BASE_MODEL_PATH": str(settings.base_model_path),
        "QUIVER_BASE_MODEL": str(settings.base_model),
    }
    result = CliRunner().invoke(app, args, env=env)
    return result.exit_code, result.output


def test_eval_scores_four_systems_stores_the_report_and_gates_promotion(
    gateway: GatewayServer, settings: Settings, lora_dirs: tuple[Path, Path, Path], unique_name: str, tmp_path: Path
) -> None:
    demo = write_demo(tmp_path / "demo", n_train=30, n_val=4, n_test=6)
    code, output = quiver(["adapters", "push", str(lora_dirs[0]), "--name", unique_name], settings)
    assert code == 0, output

    report_file = tmp_path / "report.json"
    code, output = quiver(
        [
            "eval", f"{unique_name}@v1", "--test", str(demo.test), "--train", str(demo.train),
            "--k", "2", "--gateway", gateway.url, "--output", str(report_file),
            "--probe-questions", "12", "--max-tokens", "48",
        ],
        settings,
    )  # fmt: skip
    assert code == 0, output
    for row in ("adapter", "base + system prompt", "base + few-shot", "base + RAG", "general probe: adapter"):
        assert row in output
    report = json.loads(report_file.read_text())
    assert report["model"] == f"{unique_name}@v1" and report["metric"] == "json_field_accuracy"
    assert report["examples"] == 6 and report["k"] == 2
    assert set(report["scores"]) == set(SYSTEMS) and report["errors"] == dict.fromkeys(SYSTEMS, 0)
    assert all(0 <= score <= 100 for score in report["scores"].values())
    best = report["best_baseline"]
    assert best in BASELINES and report["scores"][best] == max(report["scores"][b] for b in BASELINES)
    assert report["margin"] == round(report["scores"]["adapter"] - report["scores"][best], 2)
    assert report["probe"]["questions"] == 12 and report["probe"]["base"] > 0
    assert report["test"]["sha256"] and report["train"]["count"] == 30

    shown = httpx.get(f"{gateway.url}/v1/adapters/{unique_name}").json()
    assert shown["versions"][0]["evaluation"] == report

    # A random adapter cannot beat the baselines: prod is refused with the numbers, unless forced.
    refused = httpx.put(f"{gateway.url}/v1/adapters/{unique_name}/aliases/prod", json={"version": 1})
    assert refused.status_code == 409
    error = refused.json()["error"]
    assert error["code"] == "promotion_refused"
    assert f"for the best baseline ({best})" in error["message"] and "5-point promotion margin" in error["message"]
    code, output = quiver(["adapters", "alias", unique_name, "prod", "1"], settings)
    assert code == 1 and "promotion_refused" in output
    forced = httpx.put(f"{gateway.url}/v1/adapters/{unique_name}/aliases/prod", json={"version": 1, "force": True})
    assert forced.status_code == 200 and forced.json()["aliases"] == {"prod": 1}
