"""``quiver_manifest.json``: how an adapter was made, written beside its weights and carried into the registry.

It names the base model (and fingerprints its config and weights, so an adapter is never served on a
different model of the same name), the data (file hashes and counts), every hyperparameter, the seed,
the library versions, the loss curves, and a slot for eval results.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from core.checksums import file_sha256

MANIFEST_FILE = "quiver_manifest.json"
FORMAT_VERSION = 1
LIBRARIES = ("torch", "transformers", "peft", "trl", "datasets", "bitsandbytes", "accelerate")
# What makes two base model directories the same model: its config and its weights.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


@dataclass(frozen=True)
class LossPoint:
    """One point of a loss curve: the optimiser step and the loss there."""

    step: int
    loss: float


@dataclass(frozen=True)
class Manifest:
    """Everything ``quiver_manifest.json`` holds; ``eval`` stays None until an eval has run."""

    method: str
    base_model: Mapping[str, str]
    data: Mapping[str, Any]
    hyperparameters: Mapping[str, Any]
    seed: int
    libraries: Mapping[str, str | None]
    train_loss: Sequence[LossPoint]
    val_loss: Sequence[LossPoint]
    result: Mapping[str, Any] = field(default_factory=dict)
    eval: Mapping[str, Any] | None = None
    created_at: str = ""
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        """The JSON document."""
        return {
            "format_version": self.format_version,
            "created_at": self.created_at,
            "method": self.method,
            "base_model": dict(self.base_model),
            "data": _plain(self.data),
            "hyperparameters": _plain(self.hyperparameters),
            "seed": self.seed,
            "libraries": dict(self.libraries),
            "loss_curves": {
                "train": [{"step": p.step, "loss": p.loss} for p in self.train_loss],
                "val": [{"step": p.step, "loss": p.loss} for p in self.val_loss],
            },
            "result": _plain(self.result),
            "eval": _plain(self.eval) if self.eval is not None else None,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        """Read the JSON document back; raises KeyError or ValueError if it is not a manifest."""
        version = int(data["format_version"])
        if version > FORMAT_VERSION:
            raise ValueError(f"{MANIFEST_FILE} has format_version {version}; this Quiver reads up to {FORMAT_VERSION}")
        curves = data["loss_curves"]
        return cls(
            method=str(data["method"]),
            base_model=dict(data["base_model"]),
            data=dict(data["data"]),
            hyperparameters=dict(data["hyperparameters"]),
            seed=int(data["seed"]),
            libraries=dict(data["libraries"]),
            train_loss=tuple(LossPoint(int(p["step"]), float(p["loss"])) for p in curves["train"]),
            val_loss=tuple(LossPoint(int(p["step"]), float(p["loss"])) for p in curves["val"]),
            result=dict(data.get("result") or {}),
            eval=dict(data["eval"]) if data.get("eval") is not None else None,
            created_at=str(data.get("created_at", "")),
            format_version=version,
        )


def write_manifest(directory: Path, manifest: Manifest) -> Path:
    """Write ``quiver_manifest.json`` into ``directory`` (write, fsync, rename) and return its path."""
    path = directory / MANIFEST_FILE
    tmp = directory / f".{MANIFEST_FILE}.tmp"
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(manifest.to_dict(), f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    return path


def read_manifest(directory: Path) -> Manifest:
    """Read ``quiver_manifest.json`` from an adapter directory."""
    return Manifest.from_dict(json.loads((directory / MANIFEST_FILE).read_text(encoding="utf-8")))


def build_manifest(
    *,
    method: str,
    base_model_dir: Path,
    base_model_name: str,
    hyperparameters: Mapping[str, Any],
    seed: int,
    data: Mapping[str, Any],
    log_history: Iterable[Mapping[str, Any]],
    result: Mapping[str, Any] | None = None,
) -> Manifest:
    """A manifest for a finished run; the loss curves come from the trainer's ``log_history``."""
    train, val = loss_curves(log_history)
    return Manifest(
        method=method,
        base_model={
            "name": base_model_name,
            "path": str(base_model_dir),
            "fingerprint": base_model_fingerprint(base_model_dir),
        },
        data=data,
        hyperparameters=hyperparameters,
        seed=seed,
        libraries=library_versions(),
        train_loss=train,
        val_loss=val,
        result=result or {},
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def loss_curves(log_history: Iterable[Mapping[str, Any]]) -> tuple[tuple[LossPoint, ...], tuple[LossPoint, ...]]:
    """(train, val): the training loss at every logging step and the validation loss at every evaluation."""
    train: dict[int, float] = {}
    val: dict[int, float] = {}
    for entry in log_history:
        step = int(entry.get("step", 0))
        # A resumed run repeats the entries it restored; a step keeps its first value.
        if "loss" in entry:
            train.setdefault(step, float(entry["loss"]))
        if "eval_loss" in entry:
            val.setdefault(step, float(entry["eval_loss"]))
    return (
        tuple(LossPoint(s, v) for s, v in sorted(train.items())),
        tuple(LossPoint(s, v) for s, v in sorted(val.items())),
    )


def base_model_fingerprint(directory: Path) -> str:
    """sha256 over ``config.json`` and each weight file's sha256, in name order: the same model, byte for byte."""
    files = [directory / "config.json"]
    files += sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def examples_sha256(examples: Iterable[Mapping[str, Any]]) -> str:
    """sha256 of the examples as canonical JSON lines: what was trained on, whatever file it came from."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps(example, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def data_summary(
    train: Sequence[Mapping[str, Any]],
    val: Sequence[Mapping[str, Any]],
    files: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest's ``data``: the loader's per-file hashes and counts as given, and what reached the trainer."""
    return {
        "files": dict(files or {}),
        "train": {"examples": len(train), "sha256": examples_sha256(train)},
        "val": {"examples": len(val), "sha256": examples_sha256(val)},
    }


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries that shape training; None for one that is not installed."""
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _plain(value: Any) -> Any:
    """Mappings and sequences as dicts and lists, paths as strings: what ``json.dump`` accepts."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
