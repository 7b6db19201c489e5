"""Uploading adapters over HTTP: the registry API, and every class of bad upload refused before vLLM."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from gateway import Settings
from tests import factories
from tests.integration.openai_helpers import QUESTION, client, error_of, push
from tests.servers import GatewayServer, running_gateway


def upload(url: str, name: str, archive: Path) -> httpx.Response:
    with archive.open("rb") as f:
        return httpx.post(f"{url}/v1/adapters", data={"name": name}, files={"file": (archive.name, f)}, timeout=120)


def assert_nothing_left(gateway: GatewayServer) -> None:
    assert httpx.get(f"{gateway.url}/v1/adapters").json()["data"] == []
    store = gateway.settings.adapter_store
    leftovers = [p for p in store.rglob("*") if ".staging" not in p.parts] if store.exists() else []
    assert leftovers == [] or all(p.is_dir() and not any(p.iterdir()) for p in leftovers), leftovers
    assert gateway.gateway.residency.loaded == []


BAD_ADAPTERS: dict[str, tuple[Callable[[Path, Path], Path], int, str]] = {
    "dora": (factories.with_dora, 422, "dora"),
    "modules_to_save": (factories.with_modules_to_save, 422, "modules_to_save"),
    "bias_config": (factories.with_bias_config, 422, "bias"),
    "bias_tensor": (factories.with_bias_tensor, 422, "bias"),
    "rank_too_high": (factories.with_rank, 422, "rank"),
    "nan": (factories.with_nan, 422, "finite"),
    "wrong_shape": (factories.with_wrong_shape, 422, "shape"),
    "missing_layer": (factories.with_missing_layer, 422, "does not exist"),
    "pickle": (factories.with_pickle, 422, "safetensors"),
    "not_lora": (factories.with_peft_type, 422, "LORA"),
}


@pytest.mark.parametrize("case", sorted(BAD_ADAPTERS))
def test_bad_adapter_is_refused_and_leaves_nothing(
    gateway: GatewayServer, lora_dirs: tuple[Path, ...], tmp_path: Path, case: str
) -> None:
    make, status, words = BAD_ADAPTERS[case]
    bad = make(lora_dirs[0], tmp_path / case)
    response = upload(gateway.url, "bad", factories.tar_of(bad, tmp_path / f"{case}.tar.gz"))
    assert response.status_code == status, response.text
    assert words.lower() in error_of(response)["message"].lower()
    assert_nothing_left(gateway)


BAD_ARCHIVES: dict[str, tuple[Callable[[Path], Path], int, str]] = {
    "traversal": (lambda d: factories.traversal_tar(d / "t.tar.gz"), 400, ".."),
    "absolute": (lambda d: factories.absolute_path_tar(d / "a.tar.gz"), 400, "absolute"),
    "symlink": (lambda d: factories.symlink_tar(d / "s.tar.gz"), 400, "link"),
    "not_an_archive": (lambda d: _write(d / "x.tar.gz", b"this is not gzip"), 400, "archive"),
    "wrong_suffix": (lambda d: _write(d / "adapter.rar", b"Rar!"), 400, ".zip"),
    "truncated": (lambda d: _truncated(d / "cut.tar.gz"), 400, "unreadable"),
}


def _truncated(path: Path) -> Path:
    """A real adapter-shaped tar.gz cut off half-way, as an interrupted copy leaves it."""
    whole = factories.tar_with(
        path.with_name("whole.tar.gz"),
        {"adapter/adapter_config.json": b"{}" * 5000, "adapter/adapter_model.safetensors": bytes(range(256)) * 400},
    ).read_bytes()
    return _write(path, whole[: len(whole) // 2])


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", sorted(BAD_ARCHIVES))
def test_unsafe_archive_is_refused_and_leaves_nothing(gateway: GatewayServer, tmp_path: Path, case: str) -> None:
    make, status, words = BAD_ARCHIVES[case]
    response = upload(gateway.url, "bad", make(tmp_path))
    assert response.status_code == status, response.text
    assert words.lower() in error_of(response)["message"].lower()
    assert_nothing_left(gateway)


def test_upload_over_the_size_limit_is_413(settings: Settings, lora_dirs: tuple[Path, ...], tmp_path: Path) -> None:
    with running_gateway(settings.model_copy(update={"max_upload_bytes": 1024})) as small:
        response = upload(small.url, "big", factories.tar_of(lora_dirs[0], tmp_path / "big.tar.gz"))
        assert response.status_code == 413
        assert error_of(response)["code"] == "payload_too_large"
        assert_nothing_left(small)


def test_missing_form_fields_are_400(gateway: GatewayServer) -> None:
    response = httpx.post(f"{gateway.url}/v1/adapters", data={"name": "x"})
    assert response.status_code == 400 and error_of(response)["param"] == "file"


def test_registry_api_round_trip(gateway: GatewayServer, lora_dirs: tuple[Path, ...], tmp_path: Path) -> None:
    url = gateway.url
    first = push(url, "support", lora_dirs[0])
    assert first.status_code == 201 and first.json()["version"]["model"] == "support@v1"
    again = upload(url, "support", factories.zip_of(lora_dirs[0], tmp_path / "same.zip"))
    assert again.status_code == 200 and again.json()["created"] is False
    assert again.json()["version"]["sha256"] == first.json()["version"]["sha256"]
    assert push(url, "support", lora_dirs[1]).json()["version"]["version"] == 2

    assert httpx.put(f"{url}/v1/adapters/support/aliases/prod", json={"version": 1, "force": True}).status_code == 200
    missing = httpx.put(f"{url}/v1/adapters/support/aliases/prod", json={"version": 9})
    assert missing.status_code == 404 and "v9" in error_of(missing)["message"]
    assert httpx.put(f"{url}/v1/adapters/support/aliases/prod", json={"version": "one"}).status_code == 400

    adapter = httpx.get(f"{url}/v1/adapters/support").json()
    assert adapter["aliases"] == {"prod": 1} and [v["version"] for v in adapter["versions"]] == [1, 2]
    assert adapter["versions"][0]["aliases"] == ["prod"] and adapter["versions"][0]["rank"] == 8
    assert [a["name"] for a in httpx.get(f"{url}/v1/adapters").json()["data"]] == ["support"]
    assert httpx.get(f"{url}/v1/adapters/nope").status_code == 404

    refused = httpx.delete(f"{url}/v1/adapters/support/versions/1")
    assert refused.status_code == 409 and "prod" in error_of(refused)["message"]
    assert client(url).chat.completions.create(model="support@v2", messages=QUESTION, max_tokens=1)  # type: ignore[arg-type]
    assert gateway.gateway.residency.loaded == ["support@v2"]
    assert httpx.delete(f"{url}/v1/adapters/support/versions/2").status_code == 204
    assert gateway.gateway.residency.loaded == [], "a deleted version is unloaded from vLLM at once"
    assert httpx.get(f"{url}/v1/models/support@v2").status_code == 404
    assert httpx.get(f"{url}/v1/models/support@prod").json()["root"] == "support@v1"


def test_invalid_names_are_400(gateway: GatewayServer, lora_dirs: tuple[Path, ...]) -> None:
    for name in ("Has Space", "../x", "base", "a@b"):
        response = push(gateway.url, name, lora_dirs[0])
        assert response.status_code == 400, (name, response.text)
        assert error_of(response)["param"] == "name"
