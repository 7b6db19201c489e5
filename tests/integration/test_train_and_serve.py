"""`quiver train --push` end to end: SFT (LoRA and QLoRA) and DPO adapters of the embedded model, trained by the
CLI, pushed into the registry that a running gateway serves, answering through the official OpenAI client.

Step counts are tiny: the point is the real path from data file to served adapter, not what the adapter learns.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from typer.testing import CliRunner

from gateway import Settings
from quiver.cli import app
from tests.integration.openai_helpers import client, greedy
from tests.servers import GatewayServer

# Distinct questions: near-duplicate prompts across train and val would be refused by the leakage check.
TRAIN = [
    ("Name a primary colour.", "Red."),
    ("What is two plus two?", "Four."),
    ("Which planet is closest to the sun?", "Mercury."),
    ("What do bees make?", "Honey."),
]
VAL = [("How many legs does a spider have?", "Eight."), ("What is frozen water called?", "Ice.")]


def chat(question: str, answer: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def pair(question: str, answer: str) -> dict[str, Any]:
    # The preference format the data loader reads: a prompt and two answers, the preferred one as "chosen".
    return {"prompt": question, "chosen": answer, "rejected": "I don't know."}


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def served_env(settings: Settings) -> dict[str, str]:
    """The QUIVER_* environment under which `quiver train --push` writes to the registry the gateway reads."""
    assert settings.base_model is not None and settings.base_model_path is not None
    return {
        "QUIVER_DATA_DIR": str(settings.data_dir),
        "QUIVER_DATABASE_URL": settings.registry_url,
        "QUIVER_STORE_DIR": str(settings.adapter_store),
        "QUIVER_BASE_MODEL": settings.base_model,
        "QUIVER_BASE_MODEL_PATH": str(settings.base_model_path),
        "QUIVER_MAX_LORA_RANK": str(settings.max_lora_rank),
    }


def wait_until_served(url: str, model: str, timeout_s: float = 30) -> None:
    """The gateway notices registry writes of other processes by polling (``registry_refresh_s``): wait for it."""
    deadline = time.monotonic() + timeout_s
    with client(url) as openai_client:
        while True:
            try:
                openai_client.models.retrieve(model)
                return
            except openai.NotFoundError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


# method, peft, extra options. QLoRA on a CPU is slow (bitsandbytes dequantizes each 4-bit layer per call): one step.
CASES: dict[str, tuple[str, str, list[str]]] = {
    "sft-lora": ("sft", "lora", ["--max-steps", "2"]),
    "sft-qlora": ("sft", "qlora", ["--max-steps", "1"]),
    "dpo-lora": ("dpo", "lora", ["--max-steps", "2"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_quiver_train_push_serves_the_adapter_through_the_gateway(
    case: str, gateway: GatewayServer, settings: Settings, unique_name: str, tmp_path: Path
) -> None:
    if case.endswith("qlora"):
        pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (the training extra)")
    method, peft, extra = CASES[case]
    make = pair if method == "dpo" else chat
    data = write_jsonl(tmp_path / "train.jsonl", [make(*qa) for qa in TRAIN])
    val = write_jsonl(tmp_path / "val.jsonl", [make(*qa) for qa in VAL])
    args = ["train", "--data", str(data), "--val", str(val), "--name", unique_name, "--method", method]
    args += ["--peft", peft, "--rank", "8", "--alpha", "16", "--batch-size", "2", "--output", str(tmp_path / "runs")]

    result = CliRunner().invoke(app, [*args, *extra, "--push"], env=served_env(settings))

    assert result.exit_code == 0, result.output
    assert f"created {unique_name}@v1 (rank 8" in result.output
    wait_until_served(gateway.url, unique_name)
    text, headers = greedy(gateway.url, unique_name)
    assert headers["x-quiver-served-by"] == f"{unique_name}@v1"
    assert text.strip()
    listed = httpx.get(f"{gateway.url}/v1/adapters/{unique_name}", timeout=30).json()
    manifest = listed["versions"][0]["manifest"]
    assert manifest["method"] == method and manifest["hyperparameters"]["peft"] == peft
    assert manifest["result"]["global_step"] == int(extra[-1])
