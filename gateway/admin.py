"""The registry's HTTP API: upload adapter versions, list them, move aliases, delete versions; deployments."""

from __future__ import annotations

import shutil
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Annotated

import anyio.to_thread
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from starlette.datastructures import UploadFile

from access.keys import ADAPTERS_WRITE, INFERENCE, TENANT_RULE
from adapters import Adapter, AdapterVersion, Deployment, parse_lora_name
from core.errors import InvalidRequest, NotFound, PermissionDenied
from gateway.auth import Principal, requires
from gateway.deps import Gateway, GatewayDep
from gateway.protocol import (
    AdapterList,
    AdapterPublic,
    AliasUpdate,
    DeploymentList,
    DeploymentPublic,
    PushPublic,
    RoutingPublic,
    RoutingUpdate,
    UsageList,
    UsagePublic,
    VersionPublic,
)
from gateway.uploads import check_length, form_schema, spool

Reader = Annotated[Principal, Depends(requires(INFERENCE, ADAPTERS_WRITE))]
Writer = Annotated[Principal, Depends(requires(ADAPTERS_WRITE))]

adapters_router = APIRouter(prefix="/v1/adapters")
deployments_router = APIRouter(prefix="/v1/deployments")
usage_router = APIRouter(prefix="/v1/usage")

_UPLOAD_SCHEMA = form_schema(
    name={"type": "string", "description": "Adapter name"},
    file={"type": "string", "format": "binary", "description": ".tar.gz or .zip of a PEFT adapter directory"},
)


def version_public(version: AdapterVersion, aliases: dict[str, int], *, manifest: bool = False) -> VersionPublic:
    """Wire form of one version; the training manifest and eval report only when asked (they can be large)."""
    return VersionPublic(
        version=version.number,
        model=version.lora_name,
        sha256=version.sha256,
        rank=version.rank,
        target_modules=list(version.target_modules),
        size_bytes=version.size_bytes,
        created_at=version.created_at,
        aliases=sorted(a for a, n in aliases.items() if n == version.number),
        manifest=dict(version.manifest) if manifest and version.manifest is not None else None,
        evaluation=dict(version.evaluation) if manifest and version.evaluation is not None else None,
    )


def adapter_public(adapter: Adapter, *, manifest: bool = False) -> AdapterPublic:
    """Wire form of one adapter."""
    aliases = dict(adapter.aliases)
    return AdapterPublic(
        name=adapter.name,
        tenant=adapter.tenant,
        created_at=adapter.created_at,
        latest=adapter.latest.number,
        aliases=aliases,
        routing=RoutingPublic(
            description=adapter.routing.description,
            examples=list(adapter.routing.examples),
            fallback=list(adapter.routing.fallback) if adapter.routing.fallback is not None else None,
        ),
        versions=[version_public(v, aliases, manifest=manifest) for v in adapter.versions],
    )


@adapters_router.post("", status_code=201, response_model=PushPublic, openapi_extra=_UPLOAD_SCHEMA)
async def push(request: Request, gateway: GatewayDep, principal: Writer, response: Response) -> PushPublic:
    """Upload a new version (multipart ``name`` and ``file``); identical content returns the existing one with 200.

    A new adapter belongs to the key's tenant; an admin key may name one in ``tenant``, or leave it out to share
    the adapter with every tenant.
    """
    limit = gateway.settings.max_upload_bytes
    check_length(request, limit, "adapter uploads")
    async with gateway.uploads.hold("adapter upload"), request.form(max_files=1, max_fields=8) as form:
        name, upload = form.get("name"), form.get("file")
        if not isinstance(name, str) or not name:
            raise InvalidRequest("form field 'name' (the adapter name) is required", param="name")
        tenant = _push_tenant(principal, form.get("tenant"))
        if gateway.registry.catalog.adapters.get(name) is not None:
            writable(gateway, principal, name)  # before the upload is spooled, not after
        if not isinstance(upload, UploadFile):
            raise InvalidRequest(
                "form field 'file' (a .tar.gz or .zip of a PEFT adapter directory) is required", param="file"
            )
        workdir = Path(
            await anyio.to_thread.run_sync(lambda: tempfile.mkdtemp(prefix="upload-", dir=gateway.settings.data_dir))
        )
        try:
            archive = await anyio.to_thread.run_sync(spool, upload, workdir / "upload", limit)
            result = await gateway.registry.push_archive(name, archive, tenant=tenant)
        finally:
            await anyio.to_thread.run_sync(shutil.rmtree, workdir, True)
    if not result.created:
        response.status_code = 200
    adapter = gateway.registry.catalog.adapters.get(name)
    aliases = dict(adapter.aliases) if adapter else {}
    return PushPublic(name=name, created=result.created, version=version_public(result.version, aliases))


def _push_tenant(principal: Principal, asked: object) -> str | None:
    """Whose a newly pushed adapter becomes: the key's tenant; an admin's choice (none: shared)."""
    if asked is not None and not isinstance(asked, str):
        raise InvalidRequest("form field 'tenant' must be text", param="tenant")
    if not principal.is_admin:
        if asked and asked != principal.tenant:
            raise PermissionDenied("only an admin key may push an adapter for another tenant")
        return principal.tenant
    if asked and not TENANT_RULE.fullmatch(asked):
        raise InvalidRequest(f"invalid tenant {asked!r}", param="tenant")
    return asked or None


def visible(gateway: Gateway, principal: Principal, name: str) -> Adapter:
    """The adapter ``name`` as the caller sees it; 404 for one of another tenant, as for one that does not exist."""
    adapter = gateway.registry.catalog.visible_to(principal.visible_tenant).adapters.get(name)
    if adapter is None:
        raise NotFound(f"adapter '{name}' does not exist", param="name")
    return adapter


def writable(gateway: Gateway, principal: Principal, name: str) -> None:
    """404 unless the caller sees ``name``; 403 when it is shared and the caller is no admin."""
    adapter = visible(gateway, principal, name)
    if adapter.tenant is None and not principal.is_admin:
        raise PermissionDenied(f"adapter '{name}' is shared; only an admin key can change it")


@adapters_router.get("", response_model=AdapterList)
async def list_adapters(gateway: GatewayDep, principal: Reader) -> AdapterList:
    """Every adapter the caller sees, with its versions and aliases."""
    adapters = await gateway.registry.adapters()
    tenant = principal.visible_tenant
    return AdapterList(data=[adapter_public(a) for a in adapters if tenant is None or a.tenant in (None, tenant)])


@adapters_router.get("/{name}", response_model=AdapterPublic)
async def get_adapter(name: str, gateway: GatewayDep, principal: Reader) -> AdapterPublic:
    """One adapter, or 404."""
    visible(gateway, principal, name)
    return adapter_public(await gateway.registry.adapter(name), manifest=True)


@adapters_router.patch("/{name}", response_model=AdapterPublic)
async def set_routing(name: str, body: RoutingUpdate, gateway: GatewayDep, principal: Writer) -> AdapterPublic:
    """Change an adapter's description, example prompts or fallback chain; fields left out keep their value."""
    writable(gateway, principal, name)
    given = {k: getattr(body, k) for k in body.model_fields_set}
    for target in body.fallback or ():
        try:
            gateway.router.policy.check_target(target, "fallback")
        except ValueError as exc:
            raise InvalidRequest(str(exc), param="fallback") from None
    return adapter_public(await gateway.registry.set_routing(name, **given), manifest=True)


@adapters_router.put("/{name}/aliases/{alias}", response_model=AdapterPublic)
async def set_alias(name: str, alias: str, body: AliasUpdate, gateway: GatewayDep, principal: Writer) -> AdapterPublic:
    """Point ``name@alias`` at a version; takes effect on the next request. ``prod`` needs a passing eval report."""
    writable(gateway, principal, name)
    moved = await gateway.registry.set_alias(name, alias, body.version, force=body.force)
    return adapter_public(moved)


@adapters_router.delete("/{name}/aliases/{alias}", status_code=204)
async def delete_alias(name: str, alias: str, gateway: GatewayDep, principal: Writer) -> Response:
    """Remove an alias."""
    writable(gateway, principal, name)
    await gateway.registry.delete_alias(name, alias)
    return Response(status_code=204)


@adapters_router.delete("/{name}/versions/{number}", status_code=204)
async def delete_version(name: str, number: int, gateway: GatewayDep, principal: Writer) -> Response:
    """Delete a version; refused with 409 while an alias points at it."""
    writable(gateway, principal, name)
    await gateway.registry.delete_version(name, number)
    await gateway.pool.discard(f"{name}@v{number}")
    return Response(status_code=204)


def deployment_public(deployment: Deployment) -> DeploymentPublic:
    """Wire form of one deployment."""
    return DeploymentPublic(
        model=deployment.lora_name,
        name=deployment.name,
        version=deployment.number,
        url=deployment.url,
        served_model=deployment.served_model,
        pid=deployment.pid,
        created_at=deployment.created_at,
    )


@deployments_router.get("", response_model=DeploymentList)
async def list_deployments(gateway: GatewayDep, principal: Reader) -> DeploymentList:
    """Every version the caller sees that is served by a dedicated server of its own."""
    deployments = await gateway.registry.deployments()
    seen = gateway.registry.catalog.visible_to(principal.visible_tenant).adapters
    return DeploymentList(data=[deployment_public(d) for d in deployments if d.name in seen])


@deployments_router.delete("/{model}", response_model=DeploymentPublic)
async def delete_deployment(model: str, gateway: GatewayDep, principal: Writer) -> DeploymentPublic:
    """Unregister ``name@vN``'s deployment: its traffic returns to the adapter. The server itself keeps running
    (it may be on another machine); ``quiver deploy rm`` also stops one that quiver started."""
    name, number = parse_lora_name(model)
    writable(gateway, principal, name)
    removed = await gateway.registry.remove_deployment(name, number)
    return deployment_public(removed)


@usage_router.get("", response_model=UsageList)
async def usage(
    gateway: GatewayDep,
    principal: Reader,
    tenant: str | None = None,
    key_id: str | None = None,
    adapter: Annotated[str | None, Query(description="NAME (every version) or NAME@vN")] = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> UsageList:
    """Recorded usage per minute, tenant, key and target; a key that is no admin sees its own tenant's only."""
    if not principal.is_admin:
        if tenant not in (None, principal.tenant):
            raise NotFound(f"tenant '{tenant}' does not exist", param="tenant")
        tenant = principal.tenant
    await gateway.usage.flush()  # what this gateway counted so far, too
    rows = await gateway.registry.usage(tenant=tenant, key_id=key_id, served_by=adapter, since=since, until=until)
    return UsageList(data=[UsagePublic(**r.as_dict()) for r in rows])


# The app includes this one router: adapters, deployments and usage.
router = APIRouter()
router.include_router(adapters_router)
router.include_router(deployments_router)
router.include_router(usage_router)
