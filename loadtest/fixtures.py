"""What the benchmarks serve: random but real PEFT adapters of the base model."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console


def make_adapters(base_dir: Path, work: Path, count: int, rank: int, console: Console) -> list[Path]:
    """``count`` distinct random (but real) PEFT adapters of the base."""
    from training.synthetic import random_loras

    with console.status(f"Making {count} rank-{rank} adapters with PEFT"):
        return random_loras(base_dir, {work / f"lora-{i}": i for i in range(count)}, rank=rank)
