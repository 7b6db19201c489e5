"""The OpenAI-compatible endpoints: generation, models, health and metrics."""

from __future__ import annotations

import json
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.responses import Response

from gateway.deps import Gateway, GatewayDep, gateway_of
from gateway.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, invalid_request
from quiver.errors import InvalidRequest, ModelNotFound

router = APIRouter()


def parse_body(raw: bytes, model: type[BaseModel]) -> tuple[dict[str, Any], BaseModel]:
    """Decode and check a JSON body; every problem is a 400 naming the parameter."""
    try:
        payload = json.loads(raw)
    except ValueError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise InvalidRequest("request body must be a JSON object")
    try:
        return payload, model.model_validate(payload)
    except ValidationError as exc:
        raise invalid_request(exc.errors()) from None


# The generation routes read the gateway straight off the request: FastAPI's dependency solving
# costs more than the rest of the gateway's own work on the hot path.


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    """OpenAI chat completions, plain or streamed."""
    payload, parsed = parse_body(await request.body(), ChatCompletionRequest)
    assert isinstance(parsed, ChatCompletionRequest)
    proxy = (await gateway_of(request)).proxy
    return await proxy.generate("/v1/chat/completions", payload, parsed.stream, request.headers)


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    """OpenAI text completions, plain or streamed."""
    payload, parsed = parse_body(await request.body(), CompletionRequest)
    assert isinstance(parsed, CompletionRequest)
    proxy = (await gateway_of(request)).proxy
    return await proxy.generate("/v1/completions", payload, parsed.stream, request.headers)


def model_cards(gateway: Gateway) -> list[ModelCard]:
    """The base under each of its names, then every adapter name, version and alias."""
    base = gateway.router.base_model or "base"
    root = str(gateway.settings.base_model_path or gateway.replica.model_root or base)
    now = int(time.time())
    cards = [ModelCard(id=name, created=now, owned_by="quiver", root=root) for name in gateway.router.base_names()]
    for model_id, version in gateway.registry.catalog.model_ids().items():
        cards.append(
            ModelCard(
                id=model_id,
                created=int(version.created_at.timestamp()),
                owned_by="quiver",
                root=version.lora_name,
                parent=base,
            )
        )
    return cards


@router.get("/v1/models", response_model=ModelList)
async def list_models(gateway: GatewayDep) -> ModelList:
    """Every model string this gateway answers to."""
    return ModelList(data=model_cards(gateway))


@router.get("/v1/models/{model_id:path}", response_model=ModelCard)
async def get_model(model_id: str, gateway: GatewayDep) -> ModelCard:
    """One model string, or 404 ``model_not_found``."""
    for card in model_cards(gateway):
        if card.id == model_id:
            return card
    raise ModelNotFound(f"The model `{model_id}` does not exist", param="model")


@router.get("/health")
async def health(gateway: GatewayDep) -> JSONResponse:
    """200 while at least one vLLM replica answers; 503 with the reason otherwise."""
    replicas = [
        {
            "name": m.name,
            "url": m.replica.url,
            "state": m.replica.state,
            "model": m.replica.served_model,
            "in_flight": m.in_flight,
            "adapters_loaded": m.residency.loaded,
        }
        for m in gateway.pool.members
    ]
    up = any(m.healthy for m in gateway.pool.members)
    first = replicas[0]
    body = {
        "status": "ok" if up else "unavailable",
        "vllm": {k: first[k] for k in ("url", "state", "model")},
        "adapters_loaded": first["adapters_loaded"],
        "replicas": replicas,
    }
    if up:
        return JSONResponse(body)
    return JSONResponse(body, status_code=503, headers={"retry-after": "2"})


@router.get("/metrics")
async def metrics(gateway: GatewayDep) -> Response:
    """Prometheus text exposition."""
    return Response(gateway.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
