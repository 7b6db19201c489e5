"""`quiver train` as a user runs it: demo data in, a registered adapter with its manifest out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adapters import BaseModelSpec, Registry
from quiver.cli import app
from training.demo import write_demo
from training.manifest import read_manifest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run(args: list[str], data_dir: Path, base: Path) -> tuple[int, str]:
    env = {"QUIVER_DATA_DIR": str(data_dir), "QUIVER_BASE_MODEL_PATH": str(base), "QUIVER_BASE_MODEL": "tiny"}
    result = CliRunner().invoke(app, args, env=env)
    return result.exit_code, result.output


def test_train_on_demo_data_and_push(tiny_base: Path, tmp_path: Path) -> None:
    demo = write_demo(tmp_path / "demo", n_train=24, n_val=6, n_test=6)
    code, output = run(
        [
            "train",
            "--data",
            str(demo.train),
            "--val",
            str(demo.val),
            "--test",
            str(demo.test),
            "--name",
            "support",
            "--max-steps",
            "2",
            "--batch-size",
            "4",
            "--rank",
            "8",
            "--alpha",
            "16",
            "--output",
            str(tmp_path / "runs"),
            "--push",
        ],
        tmp_path / "data",
        tiny_base,
    )
    assert code == 0, output
    assert "Leakage check" in output and "support@v1" in output
    with Registry.open(
        f"sqlite:///{tmp_path / 'data' / 'registry.db'}",
        tmp_path / "data" / "adapters",
        base=BaseModelSpec.from_model_dir(tiny_base, "tiny"),
    ) as registry:
        version = registry.resolve("support")
    manifest = read_manifest(version.path)
    assert manifest.hyperparameters["rank"] == 8
    assert version.manifest is not None and version.manifest["hyperparameters"]["rank"] == 8
    files = json.dumps(manifest.data)
    for split in ("train", "val", "test"):
        assert split in files


def test_bad_record_names_file_and_line(tiny_base: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad.write_text(json.dumps(good) + "\n" + '{"messages": [{"role": "user"}]}\n')
    code, output = run(["train", "--data", str(bad), "--name", "x", "--max-steps", "1"], tmp_path / "data", tiny_base)
    assert code == 1
    assert "bad.jsonl:2" in output.replace("\n", "")


def test_val_that_repeats_train_is_refused(tiny_base: Path, tmp_path: Path) -> None:
    demo = write_demo(tmp_path / "demo", n_train=20, n_val=4, n_test=4)
    code, output = run(
        [
            "train",
            "--data",
            str(demo.train),
            "--val",
            str(demo.train),
            "--name",
            "x",
            "--max-steps",
            "1",
            "--output",
            str(tmp_path / "runs"),
        ],
        tmp_path / "data",
        tiny_base,
    )
    assert code == 1 and "val" in output
    assert not (tmp_path / "runs" / "x" / "adapter").exists()
