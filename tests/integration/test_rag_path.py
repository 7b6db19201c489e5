"""The RAG path end to end: `quiver rag ingest`, then `model="rag:COLLECTION"` answered by the base on vLLM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from gateway import Settings
from tests.integration.openai_helpers import client, error_of, push
from tests.servers import running_gateway, wait_until

HANDBOOK = {
    "kettle.md": "# Kettlebird kettle\n\n## Descaling\n\nDescale the Kettlebird every four weeks with citric acid. "
    "Fill it half way, add two spoons of citric acid, boil, and leave it for twenty minutes.\n",
    "router.md": "# Nimbus router\n\n## Resetting\n\nTo reset the Nimbus router, hold the pin button on the back for "
    "fifteen seconds until the light turns orange. All settings return to factory defaults.\n",
}


def ingest(settings: Settings, collection: str, files: list[Path]) -> None:
    env = dict(os.environ, QUIVER_DATA_DIR=str(settings.data_dir))
    done = subprocess.run(
        [sys.executable, "-m", "quiver.cli", "rag", "ingest", collection, *map(str, files)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr


def test_rag_answers_with_sources_directly_and_as_a_fallback(
    settings: Settings, tmp_path: Path, lora_dirs: tuple[Path, ...], unique_name: str
) -> None:
    files = []
    for name, text in HANDBOOK.items():
        (tmp_path / name).write_text(text)
        files.append(tmp_path / name)
    ingest(settings, "handbook", files)
    with running_gateway(settings) as gateway:
        listed = {m["id"]: m for m in httpx.get(f"{gateway.url}/v1/models").json()["data"]}
        assert listed["rag:handbook"]["parent"] == gateway.gateway.router.base_model
        assert httpx.get(f"{gateway.url}/v1/models/rag:handbook").json()["id"] == "rag:handbook"
        question = [{"role": "user", "content": "How do I reset my Nimbus router?"}]
        with client(gateway.url) as openai:
            raw = openai.chat.completions.with_raw_response.create(
                model="rag:handbook",
                messages=question,
                max_tokens=24,
                temperature=0,  # type: ignore[arg-type]
            )
        assert raw.headers["x-quiver-served-by"] == "rag:handbook"
        shown = json.loads(raw.headers["x-quiver-sources"])
        assert shown[0]["source"] == "router.md" and shown[0]["index"] == 1
        body = json.loads(raw.content)
        assert body["sources"][0]["source"] == "router.md"
        assert "fifteen seconds" in body["sources"][0]["text"]
        assert body["choices"][0]["message"]["content"]

        streamed = {"model": "rag:handbook", "messages": question, "max_tokens": 8, "stream": True}
        with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=streamed, timeout=120) as response:
            assert json.loads(response.headers["x-quiver-sources"])[0]["source"] == "router.md"
            lines = [line for line in response.iter_lines() if line]
        assert lines[-1] == "data: [DONE]"

        missing = httpx.post(f"{gateway.url}/v1/chat/completions", json={"model": "rag:nope", "messages": question})
        assert missing.status_code == 404 and "handbook" in error_of(missing)["message"]

        # An adapter whose files went bad answers from the handbook instead.
        push(gateway.url, unique_name, lora_dirs[0])
        httpx.patch(f"{gateway.url}/v1/adapters/{unique_name}", json={"fallback": ["rag:handbook"]})
        weights = next((settings.adapter_store / unique_name).glob("*/adapter_model.safetensors"))
        weights.chmod(0o644)  # the store makes versions read-only
        weights.write_bytes(b"broken")
        answered = httpx.post(
            f"{gateway.url}/v1/chat/completions",
            json={"model": unique_name, "messages": question, "max_tokens": 8},
            timeout=120,
        )
        assert answered.status_code == 200, answered.text
        assert answered.headers["x-quiver-served-by"] == "rag:handbook"
        assert answered.headers["x-quiver-fallback-reason"] == "adapter_load_failed"

        # A collection ingested while the gateway runs is routable within a refresh.
        ingest(settings, "late", [files[0]])
        wait_until(
            lambda: (
                httpx.post(
                    f"{gateway.url}/v1/chat/completions",
                    json={"model": "rag:late", "messages": question, "max_tokens": 2},
                    timeout=120,
                ).status_code
                == 200
            ),
            timeout_s=30,
            what="the new collection",
        )


def test_without_the_embedding_export_auto_and_rag_answer_503_until_it_is_there(
    settings: Settings,
    embeddings_dir: Path,
    tmp_path: Path,
    lora_dirs: tuple[Path, ...],
    unique_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / "router.md").write_text(HANDBOOK["router.md"])
    ingest(settings, "handbook", [tmp_path / "router.md"])
    monkeypatch.setenv("QUIVER_CACHE_DIR", str(tmp_path / "unprepared-cache"))
    question = [{"role": "user", "content": "How do I reset my Nimbus router?"}]

    def ask(model: str) -> httpx.Response:
        body = {"model": model, "messages": question, "max_tokens": 2}
        return httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=120)

    broken = f"{unique_name}-broken"
    with running_gateway(settings) as gateway:
        push(gateway.url, unique_name, lora_dirs[0])
        httpx.patch(f"{gateway.url}/v1/adapters/{unique_name}", json={"description": "Nimbus router help"})
        for model in ("auto", "rag:handbook"):
            refused = ask(model)
            assert refused.status_code == 503, refused.text
            error = error_of(refused)
            assert error["code"] == "embeddings_not_prepared" and "quiver model prepare" in error["message"]
            assert int(refused.headers["retry-after"]) > 1
        # In a fallback chain, the collection that cannot embed is passed over for the next step.
        push(gateway.url, broken, lora_dirs[1])
        httpx.patch(f"{gateway.url}/v1/adapters/{broken}", json={"fallback": ["rag:handbook", "base"]})
        weights = next((settings.adapter_store / broken).glob("*/adapter_model.safetensors"))
        weights.chmod(0o644)  # the store makes versions read-only
        weights.write_bytes(b"broken")
        passed_over = ask(broken)
        assert passed_over.status_code == 200, passed_over.text
        assert passed_over.headers["x-quiver-served-by"] == gateway.gateway.router.base_model
        assert passed_over.headers["x-quiver-fallback-reason"] == "adapter_load_failed"
        # Prepared while the gateway runs: the next request loads the model, no restart needed.
        monkeypatch.setenv("QUIVER_CACHE_DIR", str(embeddings_dir.parents[1]))
        answered = ask("rag:handbook")
        assert answered.status_code == 200, answered.text
        assert json.loads(answered.headers["x-quiver-sources"])[0]["source"] == "router.md"
        assert ask("auto").headers["x-quiver-served-by"] == f"{unique_name}@v1"
