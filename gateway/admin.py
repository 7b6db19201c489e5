"""The registry's HTTP API: upload adapter versions, list them, move aliases, delete versions; deployments."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import anyio.to_thread
from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.datastructures import UploadFile

from adapters import Adapter, AdapterVersion, Deployment, parse_lora_name
from gateway.deps import GatewayDep
from gateway.protocol import (
    AdapterList,
    AdapterPublic,
    AliasUpdate,
    DeploymentList,
    DeploymentPublic,
    PushPublic,
    VersionPublic,
)
from gateway.uploads import check_length, form_schema, spool
from quiver.errors import InvalidRequest

adapters_router = APIRouter(prefix="/v1/adapters")
deployments_router = APIRouter(prefix="/v1/deployments")

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
        created_at=adapter.created_at,
        latest=adapter.latest.number,
        aliases=aliases,
        versions=[version_public(v, aliases, manifest=manifest) for v in adapter.versions],
    )


@adapters_router.post("", status_code=201, response_model=PushPublic, openapi_extra=_UPLOAD_SCHEMA)
async def push(request: Request, gateway: GatewayDep, response: Response) -> PushPublic:
    """Upload a new version (multipart ``name`` and ``file``); identical content returns the existing one with 200."""
    limit = gateway.settings.max_upload_bytes
    check_length(request, limit, "adapter uploads")
    async with request.form(max_files=1, max_fields=8) as form:
        name, upload = form.get("name"), form.get("file")
        if not isinstance(name, str) or not name:
            raise InvalidRequest("form field 'name' (the adapter name) is required", param="name")
        if not isinstance(upload, UploadFile):
            raise InvalidRequest(
                "form field 'file' (a .tar.gz or .zip of a PEFT adapter directory) is required", param="file"
            )
        workdir = Path(
            await anyio.to_thread.run_sync(lambda: tempfile.mkdtemp(prefix="upload-", dir=gateway.settings.data_dir))
        )
        try:
            archive = await anyio.to_thread.run_sync(spool, upload, workdir / "upload", limit)
            result = await gateway.registry.call(gateway.registry.registry.push_archive, name, archive)
        finally:
            await anyio.to_thread.run_sync(shutil.rmtree, workdir, True)
    if not result.created:
        response.status_code = 200
    adapter = gateway.registry.catalog.adapters.get(name)
    aliases = dict(adapter.aliases) if adapter else {}
    return PushPublic(name=name, created=result.created, version=version_public(result.version, aliases))


@adapters_router.get("", response_model=AdapterList)
async def list_adapters(gateway: GatewayDep) -> AdapterList:
    """Every adapter with its versions and aliases."""
    adapters = await gateway.registry.call(gateway.registry.registry.adapters)
    return AdapterList(data=[adapter_public(a) for a in adapters])


@adapters_router.get("/{name}", response_model=AdapterPublic)
async def get_adapter(name: str, gateway: GatewayDep) -> AdapterPublic:
    """One adapter, or 404."""
    return adapter_public(await gateway.registry.call(gateway.registry.registry.adapter, name), manifest=True)


@adapters_router.put("/{name}/aliases/{alias}", response_model=AdapterPublic)
async def set_alias(name: str, alias: str, body: AliasUpdate, gateway: GatewayDep) -> AdapterPublic:
    """Point ``name@alias`` at a version; takes effect on the next request. ``prod`` needs a passing eval report."""
    registry = gateway.registry
    moved = await registry.call(lambda: registry.registry.set_alias(name, alias, body.version, force=body.force))
    return adapter_public(moved)


@adapters_router.delete("/{name}/aliases/{alias}", status_code=204)
async def delete_alias(name: str, alias: str, gateway: GatewayDep) -> Response:
    """Remove an alias."""
    await gateway.registry.call(gateway.registry.registry.delete_alias, name, alias)
    return Response(status_code=204)


@adapters_router.delete("/{name}/versions/{number}", status_code=204)
async def delete_version(name: str, number: int, gateway: GatewayDep) -> Response:
    """Delete a version; refused with 409 while an alias points at it."""
    await gateway.registry.call(gateway.registry.registry.delete_version, name, number)
    await gateway.residency.discard(f"{name}@v{number}")
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
async def list_deployments(gateway: GatewayDep) -> DeploymentList:
    """Every version served by a dedicated server of its own."""
    deployments = await gateway.registry.call(gateway.registry.registry.deployments)
    return DeploymentList(data=[deployment_public(d) for d in deployments])


@deployments_router.delete("/{model}", response_model=DeploymentPublic)
async def delete_deployment(model: str, gateway: GatewayDep) -> DeploymentPublic:
    """Unregister ``name@vN``'s deployment: its traffic returns to the adapter. The server itself keeps running
    (it may be on another machine); ``quiver deploy rm`` also stops one that quiver started."""
    name, number = parse_lora_name(model)
    removed = await gateway.registry.call(gateway.registry.registry.remove_deployment, name, number)
    return deployment_public(removed)


# The app includes this one router: adapters and deployments.
router = APIRouter()
router.include_router(adapters_router)
router.include_router(deployments_router)
