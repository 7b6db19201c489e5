"""``quiver up``: bring up vLLM (unless one is given) and the gateway, and stop both on Ctrl-C."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import httpx
import uvicorn
from rich.console import Console

from gateway import Settings, create_app
from quiver import embedded
from quiver.vllm_server import VllmServer, port_in_use


def _served_name(model: str) -> str:
    return Path(model.rstrip("/")).name or model


def _ask_base(vllm_url: str) -> tuple[str, str | None]:
    """The served name and root of an already running vLLM."""
    response = httpx.get(f"{vllm_url}/v1/models", timeout=10)
    response.raise_for_status()
    base = next(m for m in response.json()["data"] if m.get("parent") is None)
    return str(base["id"]), base.get("root")


def _banner(console: Console, settings: Settings, base: str, vllm_url: str, started: float) -> None:
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
        f"Push an adapter: quiver adapters push ./my-adapter --name my-adapter\n"
        f"Ctrl-C stops the gateway and vLLM.",
        soft_wrap=True,
        highlight=False,
    )
    console.rule()


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
) -> None:
    """Serve until interrupted."""
    started = time.monotonic()
    settings = Settings(host=host, port=port, max_loras=max_loras, max_lora_rank=max_lora_rank)
    if port_in_use(host, port):
        raise SystemExit(f"port {port} on {host} is already in use; choose another with --port")
    server: VllmServer | None = None
    try:
        if vllm_url:
            vllm_url = vllm_url.rstrip("/")
            with console.status(f"Asking {vllm_url} what it serves"):
                base, root = _ask_base(vllm_url)
            base_path = Path(root) if root and (Path(root) / "config.json").is_file() else None
        else:
            model_path = model or str(embedded.prepare(console=console))
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
            server.start()
            vllm_url = server.url
            with console.status("Starting vLLM (about 40 s on a CPU)") as status:
                server.wait_ready(on_wait=lambda line: status.update(f"Starting vLLM: [dim]{line}[/]"))
        settings = settings.model_copy(update={"vllm_url": vllm_url, "base_model": base, "base_model_path": base_path})
        app = create_app(settings)
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            loop="uvloop",
            http="httptools",
            log_level=settings.log_level,
            access_log=False,
        )
        gateway = uvicorn.Server(config)
        original_startup = gateway.startup

        async def startup(sockets: object = None) -> None:
            await original_startup(sockets=sockets)  # type: ignore[arg-type]
            if gateway.started:
                _banner(console, settings, base, vllm_url or "", started)

        gateway.startup = startup  # type: ignore[method-assign]
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        # One line per health poll would drown what matters.
        for noisy in ("httpx", "httpcore"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        asyncio.run(gateway.serve())
    except KeyboardInterrupt:
        pass
    finally:
        if server is not None:
            with console.status("Stopping vLLM"):
                server.stop()
        console.print("Stopped.")
