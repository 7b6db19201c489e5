"""Request bodies from hostile clients: too large (413) or too deeply nested (400), refused before they cost much."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from core.errors import InvalidRequest
from gateway import create_app
from gateway.bodies import MAX_JSON_DEPTH, json_depth, load_json
from tests import factories
from tests.unit.test_gateway_app import RestartingVllm, _client, _settings

MiB = 1024 * 1024
CHAT = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'


class Chunks:
    """A request body sent in 1 MiB chunks without a Content-Length; counts what the gateway pulled."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.sent = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        chunk = b"a" * MiB
        while self.sent < self.size:
            self.sent += MiB
            yield chunk


def _error(response: httpx.Response) -> dict[str, str | None]:
    error: dict[str, str | None] = response.json()["error"]
    return error


async def test_a_body_declared_over_the_limit_is_413_before_a_byte_of_it_is_read(tmp_path: Path) -> None:
    app = create_app(_settings(tmp_path), transport=httpx.MockTransport(RestartingVllm()))
    async for client in _client(app):
        body = Chunks(30 * MiB)
        headers = {"content-length": str(body.size), "content-type": "application/json"}
        refused = await client.post("/v1/chat/completions", content=body, headers=headers)
        assert refused.status_code == 413
        assert _error(refused) == {
            "message": f"request body is larger than the {8 * MiB}-byte limit",
            "type": "invalid_request_error",
            "param": None,
            "code": "payload_too_large",
        }
        assert refused.headers["x-request-id"]
        assert body.sent == 0


async def test_a_body_without_a_length_is_refused_once_it_passes_the_limit(tmp_path: Path) -> None:
    app = create_app(_settings(tmp_path), transport=httpx.MockTransport(RestartingVllm()))
    async for client in _client(app):
        body = Chunks(30 * MiB)
        started = time.process_time()
        refused = await client.post("/v1/chat/completions", content=body)
        spent = time.process_time() - started
        assert refused.status_code == 413 and _error(refused)["code"] == "payload_too_large"
        assert body.sent == 9 * MiB, "read one chunk past the 8 MiB limit, not the 30 MB"
        # Parsing and tokenizing the 30 MB took about 30 s of CPU before the limit.
        assert spent < 0.5


async def test_bodies_up_to_the_limit_pass_and_every_json_route_has_it(tmp_path: Path) -> None:
    app = create_app(_settings(tmp_path, max_body_bytes=len(CHAT)), transport=httpx.MockTransport(RestartingVllm()))
    async for client in _client(app):
        assert (await client.post("/v1/chat/completions", content=CHAT)).status_code == 200
        assert (await client.post("/v1/chat/completions", content=CHAT + b" ")).status_code == 413
        # FastAPI reads this one's body itself: still a 413, whether the length is declared or not.
        declared = await client.patch("/v1/adapters/a", content=b'{"examples": ["' + b"x" * 100 + b'"]}')
        assert declared.status_code == 413 and _error(declared)["code"] == "payload_too_large"
        streamed = await client.patch("/v1/adapters/a", content=Chunks(3 * MiB))
        assert streamed.status_code == 413 and _error(streamed)["code"] == "payload_too_large"


async def test_adapter_uploads_keep_their_own_larger_limit(tmp_path: Path, tiny_adapter: Path) -> None:
    app = create_app(_settings(tmp_path, max_body_bytes=1024), transport=httpx.MockTransport(RestartingVllm()))
    archive = factories.tar_of(tiny_adapter, tmp_path / "a.tar.gz").read_bytes()
    assert len(archive) > 1024
    async for client in _client(app):
        pushed = await client.post("/v1/adapters", data={"name": "a"}, files={"file": ("a.tar.gz", archive)})
        assert pushed.status_code == 201, pushed.text


def _nested(depth: int, inner: bytes = b"1") -> bytes:
    """A chat request whose ``metadata`` nests lists so that the whole body is ``depth`` levels deep."""
    lists = depth - 1  # the body's own object is the first level
    return CHAT[:-1] + b',"x":' + b"[" * lists + inner + b"]" * lists + b"}"


@pytest.mark.parametrize(
    ("text", "depth"),
    [
        (b"1", 0),
        (b'{"a": [1, {"b": []}]}', 4),
        (b'["[[[", "\\"[[", {"a": [1]}]', 3),  # brackets inside strings, after an escaped quote
        (b'["\\\\", [[]]]', 3),  # an escaped backslash does not escape the closing quote
        (b'["\\\\\\"[", []]', 2),
        ('["é]]]", [["ü"]]]'.encode(), 3),
    ],
)
def test_json_depth_counts_structure_not_text(text: bytes, depth: int) -> None:
    assert json_depth(text) == depth


async def test_json_nested_past_the_bound_is_a_400_naming_the_problem(tmp_path: Path) -> None:
    app = create_app(_settings(tmp_path), transport=httpx.MockTransport(RestartingVllm()))
    async for client in _client(app):
        # 5,000 levels made Python's decoder raise RecursionError: a 500 internal_error.
        refused = await client.post("/v1/chat/completions", content=_nested(5000))
        assert refused.status_code == 400
        assert _error(refused) == {
            "message": f"request body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_request",
        }
        assert (await client.post("/v1/chat/completions", content=_nested(MAX_JSON_DEPTH + 1))).status_code == 400
        assert (await client.post("/v1/completions", content=_nested(5000))).status_code == 400
        # Up to the bound, and brackets in text at any depth, are served.
        assert (await client.post("/v1/chat/completions", content=_nested(MAX_JSON_DEPTH))).status_code == 200
        text = b'{"model":"m","messages":[{"role":"user","content":"' + b"[" * 5000 + b'"}]}'
        assert (await client.post("/v1/chat/completions", content=text)).status_code == 200


def test_the_depth_scan_of_a_body_at_the_size_limit_is_cheap() -> None:
    # The worst bodies for the scan: every byte a bracket, or a quote.
    for body in (b"[" * (8 * MiB), b"[" * 200 + b'""' * (4 * MiB)):
        started = time.process_time()
        with pytest.raises(InvalidRequest, match="levels deep"):
            load_json(body)
        assert time.process_time() - started < 0.5
