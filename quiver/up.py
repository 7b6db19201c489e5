"""``quiver up``: bring up vLLM (unless one is given) and the gateway, and stop both on Ctrl-C."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from core import embedded, extras
from core.embeddings import export_dir
from core.errors import QuiverError
from core.processes import port_in_use
from core.vllm_server import VllmServer
from gateway import Settings, create_app, server_config
from gateway.observability import configure_logging


def _served_name(model: str) -> str:
    return Path(model.rstrip("/")).name or model


def _ask_base(vllm_url: str) -> tuple[str, str | None]:
    """The served name and root of an already running vLLM."""
    response = httpx.get(f"{vllm_url}/v1/models", timeout=10)
    response.raise_for_status()
    base = next(m for m in response.json()["data"] if m.get("parent") is None)
    return str(base["id"]), base.get("root")


def _demo_hint(url: str, has_demo: bool) -> str:
    from quiver.demo import DEMO_ADAPTER

    if not has_demo:
        return "Train the demo adapter (support triage, about 10 minutes on a CPU): make demo-adapter\n"
    message = "My Lumo lamp was charged twice, please fix this today!"
    return (
        f"The demo adapter is registered; ask it:\n"
        f"  curl {url}/v1/chat/completions -H 'content-type: application/json' "
        f'-d \'{{"model": "{DEMO_ADAPTER}", "messages": [{{"role": "user", "content": "{message}"}}]}}\'\n'
    )


def _banner(
    console: Console, settings: Settings, base: str, vllm_url: str, started: float, has_demo: bool = False
) -> None:
    host = "localhost" if settings.host in ("127.0.0.1", "0.0.0.0") else settings.host
    url = f"http://{host}:{settings.port}"
    console.rule("[bold green]Quiver is serving")
    console.print(
        f"Quiver is serving at {url} (OpenAI API under {url}/v1)\n"
        f"base model {base} on vLLM {vllm_url}; up in {time.monotonic() - started:.0f} s\n\n"
        f"Try:\n"
        f"  curl {url}/v1/models\n"
        f"  curl {url}/v1/chat/completions -H 'content-type: application/json' "
        f'-d \'{{"model": "base", "messages": [{{"role": "user", "content": "Hello!"}}]}}\'\n\n'
        f"{_demo_hint(url, has_demo)}"
        f"Push an adapter: quiver adapters push ./my-adapter --name my-adapter\n"
        f"Ctrl-C stops the gateway and vLLM.",
        soft_wrap=True,
        highlight=False,
    )
    console.rule()


SERVED_FILE = "served.json"


def write_served(settings: Settings) -> None:
    """Record what is being served, so the CLI validates pushes against the same base and rank."""
    served = {
        "base_model": settings.base_model,
        "base_model_path": str(settings.base_model_path) if settings.base_model_path else None,
        "max_lora_rank": settings.max_lora_rank,
        "vllm_url": settings.vllm_url,
    }
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    tmp = settings.data_dir / f".{SERVED_FILE}.tmp"
    tmp.write_text(json.dumps(served, indent=2))
    tmp.replace(settings.data_dir / SERVED_FILE)


def read_served(data_dir: Path) -> dict[str, Any]:
    """What the last ``quiver up`` with this data dir served, or nothing."""
    try:
        served: dict[str, Any] = json.loads((data_dir / SERVED_FILE).read_text())
        return served
    except (OSError, ValueError):
        return {}


def _settings(**values: Any) -> Settings:
    try:
        return Settings(**values)
    except ValidationError as exc:
        problems = "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
        raise UpFailed(f"invalid configuration: {problems}") from None


class UpFailed(Exception):
    """Start-up could not finish; the message says why."""


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run(
    *,
    model: str | None,
    vllm_url: str | None,
    host: str,
    port: int,
    vllm_port: int,
    max_loras: int,
    max_lora_rank: int,
    console: Console,
) -> int:
    """Serve until interrupted (Ctrl-C or SIGTERM); returns the exit code."""
    started = time.monotonic()
    # SIGTERM (a service manager, `kill`) stops vLLM in order just like Ctrl-C.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    server: VllmServer | None = None
    try:
        given = {"host": host, "port": port, "max_loras": max_loras, "max_lora_rank": max_lora_rank}
        settings = _settings(**given)
        if port_in_use(host, port):
            raise UpFailed(f"port {port} on {host} is already in use; choose another with --port")
        if vllm_url:
            if not export_dir().is_dir():
                console.print(
                    f"[yellow]warning:[/] no embeddings export at {export_dir()}: `auto` and RAG requests answer 503 "
                    "until `quiver model prepare --embeddings-only` has made it"
                )
            vllm_url = _settings(**given, vllm_url=vllm_url).vllm_url
            first = vllm_url.split(",")[0]  # replicas serve the same base; ask one
            with console.status(f"Asking {first} what it serves"):
                try:
                    base, root = _ask_base(first)
                except (httpx.HTTPError, StopIteration, KeyError, ValueError) as exc:
                    raise UpFailed(f"could not ask vLLM at {first} what it serves: {exc!r}") from None
            base_path = Path(root) if root and (Path(root) / "config.json").is_file() else None
        else:
            try:
                extras.require_vllm("`quiver up` without --vllm-url (it starts vLLM)")
                model_path = model or str(embedded.prepare(console=console))
            except QuiverError as exc:  # a gateway-only install: no vLLM, nor the ML stack to convert the model
                raise UpFailed(exc.message) from None
            base = embedded.SERVED_NAME if model is None else _served_name(model_path)
            base_path = Path(model_path) if (Path(model_path) / "config.json").is_file() else None
            server = VllmServer(
                model=model_path,
                served_name=base,
                port=vllm_port,
                log_path=settings.data_dir / "logs" / "vllm.log",
                max_loras=max_loras,
                max_lora_rank=max_lora_rank,
            )
            try:
                server.start()
                with console.status("Starting vLLM (about 40 s on a CPU)") as status:
                    server.wait_ready(on_wait=lambda line: status.update(f"Starting vLLM: [dim]{line}[/]"))
            except QuiverError as exc:  # the port is taken, or vLLM exited or did not come up (with its log)
                raise UpFailed(exc.message) from None
            vllm_url = server.url
        settings = _settings(**given, vllm_url=vllm_url, base_model=base, base_model_path=base_path)
        write_served(settings)
        return _serve(settings, base, console, started)
    except KeyboardInterrupt:
        return 0
    except UpFailed as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}")
        return 1
    finally:
        if server is not None:
            with console.status("Stopping vLLM"):
                server.stop()
        console.print("Stopped.")


def _serve(settings: Settings, base: str, console: Console, started: float) -> int:
    app = create_app(settings)
    config = server_config(app, settings, loop="uvloop", http="httptools")
    gateway = uvicorn.Server(config)
    original_startup = gateway.startup

    async def startup(sockets: object = None) -> None:
        await original_startup(sockets=sockets)  # type: ignore[arg-type]
        if gateway.started:
            from quiver.demo import DEMO_ADAPTER

            has_demo = DEMO_ADAPTER in app.state.gateway.registry.catalog.adapters
            _banner(console, settings, base, settings.vllm_url, started, has_demo)

    gateway.startup = startup  # type: ignore[method-assign]
    configure_logging(settings.log_format, "info")
    asyncio.run(gateway.serve())
    if not gateway.started:
        raise UpFailed("the gateway did not start; see the log above")
    return 0
