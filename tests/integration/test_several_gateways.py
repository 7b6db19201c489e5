"""Two gateway processes in front of one vLLM, sharing one PostgreSQL (registry, keys) and one Redis (limits,
residency hints): what one is told, the other serves; a limit holds across both."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from access.keys import ADAPTERS_WRITE, INFERENCE
from access.store import KeyStore
from adapters.db import Database
from core.vllm_server import VllmServer
from tests.integration.openai_helpers import QUESTION, tar_gz
from tests.postgres import PostgresCluster, postgres_cluster  # noqa: F401 - a fixture, used by name
from tests.redis import RedisServer, redis_server  # noqa: F401 - a fixture, used by name
from tests.servers import gateway_process, wait_until


def chat(url: str, token: str, model: str) -> httpx.Response:
    body = {"model": model, "messages": QUESTION, "max_tokens": 1, "temperature": 0}
    return httpx.post(
        f"{url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {token}"}, timeout=120
    )


@pytest.fixture
def two_gateways(
    vllm: VllmServer,
    base_model_dir: Path,
    postgres_cluster: PostgresCluster,  # noqa: F811 - the fixture imported above
    redis_server: RedisServer,  # noqa: F811
    tmp_path: Path,
) -> Iterator[tuple[list[str], str]]:
    database_url = postgres_cluster.create_database()
    store = tmp_path / "store"  # one store, as on a shared volume: vLLM loads adapters by path
    common = {
        "QUIVER_DATABASE_URL": database_url,
        "QUIVER_REDIS_URL": redis_server.url,
        "QUIVER_STORE_DIR": str(store),
        "QUIVER_BASE_MODEL_PATH": str(base_model_dir),
        "QUIVER_FINE_TUNING_WORKERS": "0",
        "QUIVER_MAX_LORAS": "2",
    }
    with ExitStack() as stack:
        urls = [
            stack.enter_context(
                gateway_process(common | {"QUIVER_DATA_DIR": str(tmp_path / f"g{i}")}, vllm.url, tmp_path / f"g{i}.log")
            ).url
            for i in range(2)
        ]
        yield urls, database_url


def test_an_adapter_pushed_on_one_gateway_is_served_by_the_other_and_limits_hold_across_both(
    two_gateways: tuple[list[str], str], lora_dirs: tuple[Path, ...], tmp_path: Path
) -> None:
    (first, second), database_url = two_gateways
    # Keys made after the gateways started: both must pick them up from the shared registry.
    database = Database.open(database_url)
    try:
        keys = KeyStore(database)
        writer = keys.create_key("acme", [INFERENCE, ADAPTERS_WRITE]).token
        limited = keys.create_key("acme", [INFERENCE], requests_per_min=4).token
        other = keys.create_key("globex", [INFERENCE]).token
    finally:
        database.close()
    auth = {"authorization": f"Bearer {writer}"}
    # Until a gateway's next registry refresh it is still open (to loopback); then keys are required.
    for url in (first, second):
        wait_until(lambda url=url: httpx.get(f"{url}/v1/models").status_code == 401, 30, f"{url} to require keys")

    pushed = httpx.post(
        f"{first}/v1/adapters",
        data={"name": "acme-bot"},
        files={"file": ("a.tar.gz", tar_gz(lora_dirs[0]), "application/gzip")},
        headers=auth,
        timeout=120,
    )
    assert pushed.status_code == 201, pushed.text
    wait_until(lambda: chat(second, writer, "acme-bot").status_code == 200, 30, "gateway 2 to serve the push")
    assert chat(second, writer, "acme-bot").headers["x-quiver-served-by"] == "acme-bot@v1"
    # It is acme's: globex does not see it on either gateway.
    for url in (first, second):
        assert chat(url, other, "acme-bot").status_code == 404

    # 4 requests a minute for this key, whichever gateway they reach.
    statuses = [chat(url, limited, "base").status_code for url in (first, second, first, second, first, second)]
    assert statuses[:4] == [200] * 4, statuses
    assert statuses[4:] == [429, 429], statuses
    refused = chat(second, limited, "base")
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
