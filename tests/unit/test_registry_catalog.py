"""Catalog: the one place model strings become adapter versions."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from adapters import Adapter, AdapterVersion, Catalog
from core.errors import ModelNotFound

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def adapter(name: str, numbers: list[int], aliases: dict[str, int] | None = None) -> Adapter:
    versions = tuple(
        AdapterVersion(name, n, f"{n:064x}", Path(f"/store/{name}/{n:064x}"), 8, ("q_proj",), 100, T0) for n in numbers
    )
    return Adapter(name, versions, aliases or {}, T0)


@pytest.fixture
def catalog() -> Catalog:
    return Catalog([adapter("bot", [1, 2, 4], {"prod": 2, "staging": 4}), adapter("faq", [1, 3])], revision=7)


def test_every_listed_id_resolves_to_its_version(catalog: Catalog) -> None:
    ids = catalog.model_ids()
    assert {k: v.lora_name for k, v in ids.items()} == {
        "bot": "bot@v2",
        "bot@v1": "bot@v1",
        "bot@v2": "bot@v2",
        "bot@v4": "bot@v4",
        "bot@prod": "bot@v2",
        "bot@staging": "bot@v4",
        "faq": "faq@v3",
        "faq@v1": "faq@v1",
        "faq@v3": "faq@v3",
    }
    assert all(catalog.resolve(k) is v for k, v in ids.items())
    assert catalog.revision == 7


def test_bare_name_is_prod_if_set_else_latest(catalog: Catalog) -> None:
    assert catalog.resolve("bot").number == 2
    assert catalog.resolve("faq").number == 3
    assert catalog.adapters["faq"].latest.number == 3


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("nobody", "model 'nobody' does not exist"),
        ("bot@v3", "model 'bot@v3' does not exist; bot has versions v1, v2, v4"),
        ("bot@v02", "model 'bot@v02' does not exist; bot has versions v1, v2, v4 and aliases prod, staging"),
        ("faq@prod", "model 'faq@prod' does not exist; faq has versions v1, v3 and aliases none"),
        ("bot@", "model 'bot@' does not exist; bot has versions v1, v2, v4 and aliases prod, staging"),
        ("Bot", "model 'Bot' does not exist"),
        ("bot@v²", "model 'bot@v²' does not exist; bot has versions v1, v2, v4 and aliases prod, staging"),
        ("", "model '' does not exist"),
    ],
)
def test_unknown_models_are_not_found_with_what_exists(catalog: Catalog, model: str, message: str) -> None:
    with pytest.raises(ModelNotFound) as caught:
        catalog.resolve(model)
    assert caught.value.message == message
    assert (caught.value.status_code, caught.value.code, caught.value.param) == (404, "model_not_found", "model")


def test_lora_name_is_name_at_version() -> None:
    assert adapter("a.b-c_d", [12]).latest.lora_name == "a.b-c_d@v12"


def test_empty_catalog_resolves_nothing() -> None:
    with pytest.raises(ModelNotFound):
        Catalog([]).resolve("bot")
    assert Catalog([]).model_ids() == {}
