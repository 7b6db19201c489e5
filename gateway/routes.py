"""The OpenAI-compatible endpoints: generation, models, health and metrics."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.responses import Response

from access.keys import INFERENCE
from adapters import AdapterVersion, Catalog
from core.errors import InvalidRequest, ModelNotFound
from gateway.auth import OPEN, Principal, requires
from gateway.bodies import load_json
from gateway.deps import Gateway, GatewayDep, gateway_of
from gateway.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, invalid_request
from gateway.router import OnFrontier

router = APIRouter()
_INFERENCE = (INFERENCE,)
InferenceCaller = Annotated[Principal, Depends(requires(INFERENCE))]
_CARDS = TypeAdapter(list[ModelCard])


def parse_body(raw: bytes, model: type[BaseModel]) -> tuple[dict[str, Any], BaseModel]:
    """Decode and check a JSON body; every problem is a 400 naming the parameter."""
    payload = load_json(raw)
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
    gateway = await gateway_of(request)
    principal = gateway.auth.authenticate(request, _INFERENCE)
    payload, parsed = parse_body(await request.body(), ChatCompletionRequest)
    assert isinstance(parsed, ChatCompletionRequest)
    return await _generate(gateway, principal, request, "/v1/chat/completions", payload, parsed)


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    """OpenAI text completions, plain or streamed."""
    gateway = await gateway_of(request)
    principal = gateway.auth.authenticate(request, _INFERENCE)
    payload, parsed = parse_body(await request.body(), CompletionRequest)
    assert isinstance(parsed, CompletionRequest)
    return await _generate(gateway, principal, request, "/v1/completions", payload, parsed)


async def _generate(
    gateway: Gateway,
    principal: Principal,
    request: Request,
    endpoint: str,
    payload: dict[str, Any],
    parsed: ChatCompletionRequest | CompletionRequest,
) -> Response:
    """Plan the request, admit it against its key's and tenant's limits (its prompt counted by the tokenizer of
    the target it goes to first), then serve it along its plan and answer with the limits' headers."""
    _check_choices(parsed, gateway.settings.max_n)
    generation = gateway.proxy.request(endpoint, payload, parsed.stream, principal)
    plan = await gateway.proxy.plan(generation, request.headers)
    limits = await gateway.limiter.admit(principal, generation.prompt, frontier=isinstance(plan.first, OnFrontier))
    response = await gateway.proxy.serve(plan, generation)
    response.headers.update(limits)
    return response


def _check_choices(parsed: ChatCompletionRequest | CompletionRequest, max_n: int) -> None:
    """At most ``max_n`` completions generated per request, whether returned (``n``) or chosen from (``best_of``)."""
    # Each is a generation of its own: a multiplier on everything vLLM does for the request.
    for name, value, what in (("n", parsed.n, "choices"), ("best_of", parsed.best_of, "completions to choose from")):
        if value is not None and value > max_n:
            raise InvalidRequest(f"{name}: at most {max_n} {what} per request, got {value}", param=name)


def _base_name(gateway: Gateway) -> str:
    return gateway.router.base_model or "base"


def _base_cards(gateway: Gateway) -> list[ModelCard]:
    """The base under each of its names, then ``rag:COLLECTION`` (the base answering from a collection)."""
    base = _base_name(gateway)
    now = int(time.time())
    # The served model's name, never the server's path to its files: clients see no file system.
    cards = [ModelCard(id=name, created=now, owned_by="quiver", root=base) for name in gateway.router.base_names()]
    rag = (f"rag:{c}" for c in gateway.rag.names())
    return cards + [ModelCard(id=name, created=now, owned_by="quiver", root=name, parent=base) for name in rag]


def _adapter_card(model_id: str, version: AdapterVersion, parent: str) -> ModelCard:
    created = int(version.created_at.timestamp())
    return ModelCard(id=model_id, created=created, owned_by="quiver", root=version.lora_name, parent=parent)


def _adapter_cards_json(catalog: Catalog, parent: str) -> bytes:
    """Every adapter name, version and alias as the JSON of ``/v1/models`` entries, comma-separated."""
    cards = [_adapter_card(model_id, version, parent) for model_id, version in catalog.model_ids().items()]
    return _CARDS.dump_json(cards)[1:-1]  # the list's items, without its brackets


def model_cards_json(gateway: Gateway, principal: Principal = OPEN) -> bytes:
    """The ``/v1/models`` body: the base under each of its names, the RAG collections, then every adapter name,
    version and alias the caller's tenant sees.

    The adapters' part is serialized once per registry snapshot and tenant: with thousands of versions,
    building and serializing every card on each request would cost tens of milliseconds.
    """
    parent = _base_name(gateway)
    tenant = principal.visible_tenant
    adapters = gateway.registry.derived(
        ("model-cards", parent, tenant), lambda c: _adapter_cards_json(c.visible_to(tenant), parent)
    )
    base = _CARDS.dump_json(_base_cards(gateway))[1:-1]
    return b'{"object":"list","data":[' + b",".join(part for part in (base, adapters) if part) + b"]}"


@router.get("/v1/models", response_model=ModelList)
async def list_models(gateway: GatewayDep, principal: InferenceCaller) -> Response:
    """Every model string this gateway answers to (for this caller)."""
    return Response(model_cards_json(gateway, principal), media_type="application/json")


@router.get("/v1/models/{model_id:path}", response_model=ModelCard)
async def get_model(model_id: str, gateway: GatewayDep, principal: InferenceCaller) -> ModelCard:
    """One model string, or 404 ``model_not_found``."""
    for card in _base_cards(gateway):
        if card.id == model_id:
            return card
    version = gateway.registry.catalog.visible_to(principal.visible_tenant).model_ids().get(model_id)
    if version is None:
        raise ModelNotFound(f"The model `{model_id}` does not exist", param="model")
    return _adapter_card(model_id, version, _base_name(gateway))


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
