"""``quiver deploy``: serve one adapter version from a merged model of its own, and tell the router.

A deployment is a registry row (``DeploymentStore.add_deployment``); gateways see it in their next snapshot
and send the version's traffic to its URL. ``quiver deploy merged`` either starts a dedicated vLLM for
the version's merged model on this machine (LoRA off, detached so that it outlives the CLI) or
registers a server that runs elsewhere (``--url``, e.g. a Kubernetes Deployment).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from adapters import AdapterVersion, Deployment, DeploymentStore
from core.errors import Conflict, InvalidRequest, UpstreamError
from core.processes import port_in_use, stop_detached
from core.vllm_server import VllmServer, vllm_command_line


def served_models(url: str, timeout_s: float = 10.0) -> list[str]:
    """The model ids an OpenAI-compatible server at ``url`` lists; UpstreamError when it does not answer."""
    try:
        response = httpx.get(f"{url.rstrip('/')}/v1/models", timeout=timeout_s)
        response.raise_for_status()
        return [str(m["id"]) for m in response.json()["data"]]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
        raise UpstreamError(f"{url}/v1/models did not list models: {e}") from e


def register_url(
    deployments: DeploymentStore, version: AdapterVersion, url: str, served_model: str | None = None
) -> Deployment:
    """Register a server that already runs at ``url``; it must list ``served_model`` (default: ``name@vN``,
    else the one model it serves)."""
    models = served_models(url)
    if served_model is None:
        served_model = version.lora_name if version.lora_name in models or len(models) != 1 else models[0]
    if served_model not in models:
        raise InvalidRequest(
            f"{url} serves {', '.join(models) or 'no model'}, not {served_model}; name the model with --served-model",
            param="served_model",
        )
    return deployments.add_deployment(version.name, version.number, url, served_model)


def start_merged(
    deployments: DeploymentStore,
    version: AdapterVersion,
    *,
    port: int,
    log_dir: Path,
    host: str = "127.0.0.1",
    timeout_s: float = 600.0,
    on_wait: Callable[[str], None] | None = None,
    extra_args: tuple[str, ...] = (),
) -> Deployment:
    """Start a detached vLLM (LoRA off) for the version's newest merge, wait until it lists the model, register it.

    The server answers to ``name@vN``. Conflict unless the newest merge was found equivalent and its
    directory is there, or when the version is already deployed; if anything fails, the server is stopped.
    """
    lora_name = version.lora_name
    deployments.check_deployable(version.name, version.number)
    merge = deployments.latest_merge(version.name, version.number)
    if merge is None:
        raise Conflict(f"{lora_name} has not been merged; run `quiver merge {lora_name}` first")
    if not merge.equivalent:
        raise Conflict(
            f"the newest merge of {lora_name} ({merge.path}) was not equivalent to base + adapter; "
            f"see `quiver merge {lora_name}` for why"
        )
    if not (merge.path / "config.json").is_file():
        raise Conflict(f"the merged model of {lora_name} is missing from {merge.path}; run `quiver merge {lora_name}`")
    if port_in_use(host, port):
        raise InvalidRequest(f"port {port} on {host} is already in use; pick another with --port", param="port")
    server = VllmServer(
        model=str(merge.path),
        served_name=lora_name,
        port=port,
        log_path=log_dir / f"deploy-{lora_name}.log",
        host=host,
        extra_args=extra_args,
        enable_lora=False,
        detach=True,
    )
    try:
        server.start()
        server.wait_ready(timeout_s, on_wait)
        if lora_name not in served_models(server.url):
            raise UpstreamError(f"vLLM at {server.url} does not list {lora_name}; log {server.log_path}")
        assert server.process is not None
        return deployments.add_deployment(version.name, version.number, server.url, lora_name, pid=server.process.pid)
    except BaseException:  # ProcessFailed (an UpstreamError) when vLLM died or did not come up, with its log
        server.stop()
        raise


def remove(
    deployments: DeploymentStore,
    name: str,
    number: int,
    grace_s: float = 20.0,
    *,
    settle_s: float = 3.0,
    drain_s: float = 60.0,
) -> tuple[Deployment, bool]:
    """Unregister the deployment first (its traffic returns to the adapter), then stop its server.

    Only a server ``quiver deploy merged`` started here, and only while its pid is still that vLLM; and only
    once gateways have seen the change (``settle_s``, a few registry refreshes) and the requests it was
    serving have finished (up to ``drain_s``), so no answer is cut off. Returns the deployment and whether a
    server was stopped.
    """
    deployment = deployments.remove_deployment(name, number)
    if deployment.pid is None or deployment.served_model not in vllm_command_line(deployment.pid):
        return deployment, False
    time.sleep(settle_s)
    deadline = time.monotonic() + drain_s
    while time.monotonic() < deadline and requests_in_progress(deployment.url) > 0:
        time.sleep(0.2)
    stop_detached(deployment.pid, grace_s)
    return deployment, True


def requests_in_progress(url: str) -> int:
    """Requests a vLLM is running or has queued, from its Prometheus metrics (0 when it does not answer)."""
    try:
        text = httpx.get(f"{url.rstrip('/')}/metrics", timeout=5).text
    except httpx.HTTPError:
        return 0
    pattern = r"^vllm:num_requests_(?:running|waiting)\{[^}]*\} ([0-9.e+]+)$"
    return int(sum(float(v) for v in re.findall(pattern, text, flags=re.MULTILINE)))
