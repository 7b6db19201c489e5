"""What the benchmarks serve: random but real PEFT adapters of the base model, pushed through the gateway's API."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import httpx
from rich.console import Console


def make_adapters(base_dir: Path, work: Path, count: int, rank: int, console: Console) -> list[Path]:
    """``count`` distinct random (but real) PEFT adapters of the base."""
    from training.synthetic import random_loras

    with console.status(f"Making {count} rank-{rank} adapters with PEFT"):
        return random_loras(base_dir, {work / f"lora-{i}": i for i in range(count)}, rank=rank)


def _tar_gz(directory: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(directory.iterdir()):
            tar.add(path, arcname=path.name)
    return buffer.getvalue()


def push(gateway_url: str, name: str, directory: Path) -> None:
    """Upload an adapter directory through the gateway's HTTP API."""
    response = httpx.post(
        f"{gateway_url}/v1/adapters",
        data={"name": name},
        files={"file": (f"{name}.tar.gz", _tar_gz(directory), "application/gzip")},
        timeout=300,
    )
    response.raise_for_status()
