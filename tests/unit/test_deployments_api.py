"""The admin API for deployments, in-process against a MockTransport vLLM and a real SQLite registry."""

from __future__ import annotations

from pathlib import Path

import httpx

from adapters import DeploymentStore
from gateway import create_app
from tests import factories
from tests.unit.test_gateway_app import RestartingVllm, _client, _settings, registry_of


async def test_deployments_are_listed_and_unregistered_through_the_admin_api(tmp_path: Path) -> None:
    app = create_app(_settings(tmp_path), transport=httpx.MockTransport(RestartingVllm()))
    async for client in _client(app):
        view = app.state.gateway.registry
        with registry_of(app) as registry:
            registry.push_dir("a", factories.make_lora_adapter(factories.tiny_llama_model(), tmp_path / "adapter"))
            DeploymentStore.beside(registry).add_deployment("a", 1, "http://127.0.0.1:9100", "a@v1", pid=77)
        await view.refresh()
        assert set(view.catalog.deployments) == {"a@v1"}  # what the router reads

        listed = (await client.get("/v1/deployments")).json()
        assert listed["object"] == "list"
        [entry] = listed["data"]
        assert {k: entry[k] for k in ("object", "model", "name", "version", "url", "served_model", "pid")} == {
            "object": "deployment",
            "model": "a@v1",
            "name": "a",
            "version": 1,
            "url": "http://127.0.0.1:9100",
            "served_model": "a@v1",
            "pid": 77,
        }

        refused = await client.delete("/v1/adapters/a/versions/1")
        assert refused.status_code == 409
        assert "a@v1 is deployed at http://127.0.0.1:9100" in refused.json()["error"]["message"]

        removed = await client.delete("/v1/deployments/a@v1")
        assert removed.status_code == 200 and removed.json()["model"] == "a@v1"
        assert view.catalog.deployments == {}  # refreshed before the answer: the next request uses the adapter
        assert (await client.get("/v1/deployments")).json()["data"] == []

        again = await client.delete("/v1/deployments/a@v1")
        assert again.status_code == 404
        assert again.json()["error"] == {
            "message": "a@v1 is not deployed",
            "type": "invalid_request_error",
            "param": "model",
            "code": "not_found",
        }
        bad = await client.delete("/v1/deployments/a@prod")
        assert bad.status_code == 400 and "use NAME@vN" in bad.json()["error"]["message"]
