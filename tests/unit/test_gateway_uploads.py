"""Hostile adapter uploads through the gateway: bombs refused cheaply, leaving nothing; a bound on uploads at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from gateway import create_app
from tests import factories
from tests.unit.test_gateway_app import RestartingVllm, _client, _settings

GiB = 1024**3


def _left_behind(data_dir: Path) -> list[Path]:
    """Files anywhere under the gateway's data directory but its SQLite databases (and their journals)."""
    return [p for p in data_dir.rglob("*") if p.is_file() and ".db" not in p.name]


@pytest.mark.parametrize(
    ("name", "status", "code"),
    [("adapter/README.md", 400, "invalid_archive"), ("adapter/adapter_model.safetensors", 422, "invalid_adapter")],
)
async def test_a_decompression_bomb_push_is_refused_cheaply_and_leaves_nothing(
    name: str, status: int, code: str, tmp_path: Path
) -> None:
    bomb = factories.tar_bomb(tmp_path / "bomb.tgz", 3 * GiB, name=name).read_bytes()
    data_dir = tmp_path / "data"
    app = create_app(_settings(data_dir), transport=httpx.MockTransport(RestartingVllm()))
    async for client in _client(app):
        started = time.process_time()
        refused = await client.post("/v1/adapters", data={"name": "bomb"}, files={"file": ("bomb.tgz", bomb)})
        spent = time.process_time() - started
        assert refused.status_code == status, refused.text
        assert refused.json()["error"]["code"] == code
        # Extracting the 3 GiB took 6-11 s of CPU before its 422.
        assert spent < 0.5
        assert (await client.get("/v1/adapters")).json()["data"] == []
        assert _left_behind(data_dir) == []


class _Held:
    """A request body that stops after its first part until ``release`` is set, holding its upload open."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        self.started.set()
        yield self.body[:100]
        await self.release.wait()
        yield self.body[100:]


async def test_uploads_past_the_bound_are_503_with_retry_after(tmp_path: Path, tiny_adapter: Path) -> None:
    archive = factories.tar_of(tiny_adapter, tmp_path / "a.tar.gz").read_bytes()
    form = httpx.Request("POST", "http://gateway/v1/adapters", data={"name": "a"}, files={"file": ("a.tgz", archive)})
    body = form.read()
    headers = {"content-type": form.headers["content-type"], "content-length": str(len(body))}
    app = create_app(_settings(tmp_path, max_concurrent_uploads=1), transport=httpx.MockTransport(RestartingVllm()))
    async for client in _client(app):
        held = _Held(body)
        first = asyncio.create_task(client.post("/v1/adapters", content=held, headers=headers))
        await held.started.wait()  # the first upload holds the one slot while its body arrives
        busy = await client.post("/v1/adapters", content=body, headers=headers)
        assert busy.status_code == 503
        assert busy.json()["error"] == {
            "message": "1 uploads are being handled, the most at once; retry the adapter upload shortly",
            "type": "service_unavailable",
            "param": None,
            "code": "uploads_busy",
        }
        assert busy.headers["retry-after"] == "5"
        held.release.set()
        assert (await first).status_code == 201
        # The slot is free again: the same content is already registered.
        assert (await client.post("/v1/adapters", content=body, headers=headers)).status_code == 200


def _form(path: str, data: dict[str, str], file: tuple[str, bytes]) -> tuple[bytes, dict[str, str]]:
    """A multipart body and the headers that declare it."""
    form = httpx.Request("POST", f"http://gateway{path}", data=data, files={"file": file})
    body = form.read()
    return body, {"content-type": form.headers["content-type"], "content-length": str(len(body))}


async def test_training_file_uploads_count_against_the_same_bound(tmp_path: Path) -> None:
    training, training_headers = _form("/v1/files", {"purpose": "fine-tune"}, ("train.jsonl", factories.chat_jsonl(4)))
    archive, archive_headers = _form("/v1/adapters", {"name": "a"}, ("a.tgz", b"never read: refused before"))
    app = create_app(_settings(tmp_path, max_concurrent_uploads=1), transport=httpx.MockTransport(RestartingVllm()))
    async for client in _client(app):
        held = _Held(training)
        first = asyncio.create_task(client.post("/v1/files", content=held, headers=training_headers))
        await held.started.wait()  # a training file holds the one slot while its body arrives
        for path, body, headers, what in (
            ("/v1/files", training, training_headers, "training file upload"),
            ("/v1/adapters", archive, archive_headers, "adapter upload"),
        ):
            busy = await client.post(path, content=body, headers=headers)
            assert busy.status_code == 503 and busy.headers["retry-after"] == "5"
            assert busy.json()["error"]["code"] == "uploads_busy"
            assert (
                busy.json()["error"]["message"]
                == f"1 uploads are being handled, the most at once; retry the {what} shortly"
            )
        held.release.set()
        assert (await first).status_code == 200
        # The slot is free again.
        assert (await client.post("/v1/files", content=training, headers=training_headers)).status_code == 200
