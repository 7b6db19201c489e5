"""Small shared pieces for the integration tests."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import httpx
from openai import OpenAI

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def client(url: str) -> OpenAI:
    """The official OpenAI client pointed at a gateway (or vLLM) URL."""
    return OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def greedy(url: str, model: str, max_tokens: int = 16) -> tuple[str, httpx.Headers]:
    """A deterministic chat answer and the response headers."""
    # Closed here: a client left to the garbage collector warns about its open socket in whichever test comes next.
    with client(url) as openai:
        raw = openai.chat.completions.with_raw_response.create(
            model=model,
            messages=QUESTION,
            max_tokens=max_tokens,
            temperature=0,
            seed=0,  # type: ignore[arg-type]
        )
        return raw.parse().choices[0].message.content or "", raw.headers


def tar_gz(directory: Path) -> bytes:
    """A .tar.gz of an adapter directory, as a user would make with `tar czf`."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(directory.iterdir()):
            tar.add(path, arcname=path.name)
    return buffer.getvalue()


def push(url: str, name: str, directory: Path) -> httpx.Response:
    """Upload an adapter directory through the HTTP API."""
    return httpx.post(
        f"{url}/v1/adapters",
        data={"name": name},
        files={"file": (f"{name}.tar.gz", tar_gz(directory), "application/gzip")},
        timeout=120,
    )


def error_of(response: httpx.Response) -> dict[str, Any]:
    """The OpenAI error object of a response, asserting its shape."""
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    error: dict[str, Any] = body["error"]
    return error
