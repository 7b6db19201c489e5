"""The gateway's part of the registry needs no torch: reading the base model, validating adapters, pushing them.

Each check runs in a fresh interpreter whose first import finder refuses torch and the libraries built on it,
as a lean gateway process must never import them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.embeddings import Embedder
from tests import factories as f
from tests import import_guard

REPO = Path(__file__).resolve().parents[2]

# Both bases' specs; the adapters validated against the tiny one and pushed to a registry on it.
PUSH = textwrap.dedent(
    """
    import json
    from pathlib import Path

    import gateway.app
    from adapters import BaseModelSpec, Registry, validate_adapter_dir

    tiny_dir, embedded_dir, work, *adapter_dirs = map(Path, sys.argv[1:])
    specs = {"tiny": BaseModelSpec.from_model_dir(tiny_dir), "embedded": BaseModelSpec.from_model_dir(embedded_dir)}
    infos = [validate_adapter_dir(d, specs["tiny"], 16) for d in adapter_dirs]
    with Registry.open(f"sqlite:///{work / 'registry.db'}", work / "store", base=specs["tiny"]) as registry:
        pushed = [registry.push_dir(f"a{i}", d).version.lora_name for i, d in enumerate(adapter_dirs)]
    print(json.dumps({
        "specs": {
            key: [spec.linear_shapes.copy(), sorted(spec.embedding_modules), spec.architecture]
            for key, spec in specs.items()
        },
        "infos": [[info.rank, info.tensor_count] for info in infos],
        "pushed": pushed,
        "loaded": sorted(m for m in sys.modules if m.partition(".")[0] in FORBIDDEN),
    }))
    """
)

# The gateway in front of a fake vLLM: it reads the base model's spec at start-up, then checks each upload against it.
UPLOAD = textwrap.dedent(
    """
    import asyncio
    import json
    from pathlib import Path

    import httpx

    from gateway import Settings, create_app

    base_dir, data_dir, *archives = map(Path, sys.argv[1:])

    def vllm(request):
        return httpx.Response(200, json={"data": [{"id": "m", "root": str(base_dir), "parent": None}]})

    async def upload_all():
        settings = Settings(data_dir=data_dir, base_model="m", base_model_path=base_dir, health_interval_s=3600)
        app = create_app(settings, transport=httpx.MockTransport(vllm))
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gateway") as client:
                answers = []
                for archive in archives:
                    files = {"file": (archive.name, archive.read_bytes())}
                    answer = await client.post("/v1/adapters", data={"name": archive.stem}, files=files)
                    answers.append([answer.status_code, answer.text])
                return answers

    answers = asyncio.run(upload_all())
    print(json.dumps({
        "answers": answers,
        "loaded": sorted(m for m in sys.modules if m.partition(".")[0] in FORBIDDEN),
        "embedder_loaded": "onnxruntime" in sys.modules,
    }))
    """
)

# The embedder as the gateway uses it, counting this process's threads around its load and its calls.
EMBED = textwrap.dedent(
    """
    import json
    import os
    from pathlib import Path

    import numpy
    import onnxruntime
    import tokenizers

    from core.embeddings import Embedder

    directory, texts = Path(sys.argv[1]), json.loads(sys.argv[2])

    def threads():
        return len(os.listdir("/proc/self/task"))

    before = threads()
    embedder = Embedder(directory)
    vectors = embedder.encode(texts)
    spans = embedder.token_spans(texts[0])
    print(json.dumps({
        "vectors": vectors.tolist(),
        "spans": spans,
        "threads_started": threads() - before,
        "loaded": sorted(m for m in sys.modules if m.partition(".")[0] in FORBIDDEN),
    }))
    """
)


def run_guarded(code: str, *args: Path | str, log: Path) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter started with the import guard, which logs refused imports to ``log``."""
    env = import_guard.environment(log, {**os.environ, "PYTHONPATH": str(REPO)})
    prelude = f"import sys\nFORBIDDEN = {import_guard.FORBIDDEN!r}\n"
    command = [sys.executable, "-c", prelude + code, *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)


def last_json_line(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


def test_the_guard_refuses_torch_and_logs_the_attempt(tmp_path: Path) -> None:
    log = tmp_path / "refused.log"
    done = run_guarded("import transformers", log=log)
    assert done.returncode == 1
    assert "transformers imported in a process that must not import it" in done.stderr
    [attempt] = import_guard.attempts(log)
    assert attempt.startswith("refused import of transformers in pid ") and '"<string>", line 3' in attempt


def test_base_spec_validation_and_push_run_without_torch(
    tiny_llama_dir: Path, base_model_dir: Path, tmp_path: Path
) -> None:
    fp32 = f.make_lora_adapter(f.tiny_llama_model(), tmp_path / "fp32")
    bf16 = f.with_dtype(f.copy_adapter(fp32, tmp_path / "bf16"), torch.bfloat16)
    (tmp_path / "work").mkdir()

    log = tmp_path / "refused.log"
    guarded = run_guarded(PUSH, tiny_llama_dir, base_model_dir, tmp_path / "work", fp32, bf16, log=log)
    result = last_json_line(guarded)

    assert result["loaded"] == [] and import_guard.attempts(tmp_path / "refused.log") == []
    for key, model_dir in (("tiny", tiny_llama_dir), ("embedded", base_model_dir)):
        linear_shapes, embedding_modules, architecture = result["specs"][key]
        expected = f.meta_device_spec(model_dir, "")
        assert {module: tuple(shape) for module, shape in linear_shapes.items()} == expected.linear_shapes
        assert (set(embedding_modules), architecture) == (expected.embedding_modules, expected.architecture)
    assert result["infos"] == [[8, 2 * 2 * 2]] * 2  # rank 8; layers x modules x (A, B)
    assert result["pushed"] == ["a0@v1", "a1@v1"]


def test_the_gateway_checks_uploads_against_its_base_without_torch(tiny_llama_dir: Path, tmp_path: Path) -> None:
    good = f.make_lora_adapter(f.tiny_llama_model(), tmp_path / "good")
    bf16 = f.with_dtype(f.copy_adapter(good, tmp_path / "bf16"), torch.bfloat16)
    missing = f.with_missing_layer(good, tmp_path / "missing")
    archives = [f.tar_of(d, tmp_path / f"{d.name}.gz") for d in (bf16, missing)]
    (tmp_path / "data").mkdir()

    guarded = run_guarded(UPLOAD, tiny_llama_dir, tmp_path / "data", *archives, log=tmp_path / "refused.log")
    result = last_json_line(guarded)

    assert result["loaded"] == [] and import_guard.attempts(tmp_path / "refused.log") == []
    assert not result["embedder_loaded"], "the embedder loads on the first auto or RAG request, not at start-up"
    (created, _), (refused, message) = result["answers"]
    assert (created, refused) == (201, 422)
    assert "does not exist in base model LlamaForCausalLM" in message


def test_the_embedder_runs_without_torch_on_one_thread(
    embeddings_dir: Path, embedder: Embedder, tmp_path: Path
) -> None:
    texts = [f"Sentence number {i} about refunds, routers and kettles." for i in range(100)]

    result = last_json_line(run_guarded(EMBED, embeddings_dir, json.dumps(texts), log=tmp_path / "refused.log"))

    assert result["loaded"] == [] and import_guard.attempts(tmp_path / "refused.log") == []
    # ONNX Runtime without its thread pools, the tokenizer without its batch threads.
    assert result["threads_started"] == 0
    assert np.allclose(np.array(result["vectors"], dtype=np.float32), embedder.encode(texts), atol=1e-5)
    assert [tuple(span) for span in result["spans"]] == embedder.token_spans(texts[0])
