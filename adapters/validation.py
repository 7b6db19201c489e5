"""Check that a directory holds a LoRA adapter vLLM can serve on the base model, before vLLM sees it.

vLLM answers a bad adapter with a bare 500 at load time (DoRA, ``modules_to_save``, bias training,
rank above ``--max-lora-rank``) or, worse, loads it and misbehaves; here each problem becomes an
InvalidAdapter (422) that names it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, BinaryIO

from adapters.spec import EMBEDDING_LEAVES, BaseModelSpec
from adapters.tensorfile import DTYPES, TensorEntry, TensorFileError, count_nonfinite, read_header_from
from core.errors import InvalidAdapter

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MANIFEST_FILE = "quiver_manifest.json"
REQUIRED_FILES = (CONFIG_FILE, WEIGHTS_FILE)
OPTIONAL_FILES = ("README.md", MANIFEST_FILE)
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".ckpt"})

# PEFT saves LoRA weights without the adapter name: base_model.model.<module>.lora_A.weight
_LORA_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<half>[AB])\.weight")
_DECODER_ONLY = "vLLM here serves LoRA on the decoder's linear layers only"


@dataclass(frozen=True)
class AdapterInfo:
    """What validation learned about an adapter; ``rank`` is the largest rank any module uses."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    tensor_count: int
    size_bytes: int
    base_model_name_or_path: str | None
    manifest: Mapping[str, Any] | None = None


def validate_adapter_dir(directory: Path, base: BaseModelSpec | None, max_lora_rank: int) -> AdapterInfo:
    """Raise InvalidAdapter unless ``directory`` is a PEFT LoRA adapter servable on ``base``.

    ``max_lora_rank`` is the server's slot size; whether vLLM accepts it (1, 8, 16, 32, 64, 128, 256,
    320, 512) is the server's concern. With ``base=None`` only the adapter's own consistency is checked.
    """
    size_bytes = sum(f.stat().st_size for f in adapter_files(directory))
    config = _read_json(directory / CONFIG_FILE)
    r, rank_pattern = _check_config(config, max_lora_rank)
    manifest = _read_manifest(directory / MANIFEST_FILE)
    ranks, tensor_count = _check_weights(directory / WEIGHTS_FILE, base, r, rank_pattern)
    base_name = config.get("base_model_name_or_path")
    return AdapterInfo(
        rank=max(ranks.values()),
        alpha=float(config.get("lora_alpha", 8)),
        target_modules=tuple(sorted({module.rsplit(".", 1)[-1] for module in ranks})),
        tensor_count=tensor_count,
        size_bytes=size_bytes,
        base_model_name_or_path=base_name if isinstance(base_name, str) else None,
        manifest=manifest,
    )


def adapter_files(directory: Path) -> list[Path]:
    """The adapter's files, refusing anything but the known names as regular files (reads no content)."""
    allowed = ", ".join(REQUIRED_FILES + OPTIONAL_FILES)
    files: list[Path] = []
    for entry in sorted(directory.iterdir()):
        name = entry.name
        if entry.is_symlink() or not entry.is_file():
            raise InvalidAdapter(f"'{name}' is not a regular file; an adapter is a flat directory of: {allowed}")
        if entry.suffix.lower() in PICKLE_SUFFIXES:
            raise InvalidAdapter(
                f"'{name}' is a pickle file, which can run code when loaded; "
                f"only safetensors weights are accepted ({WEIGHTS_FILE})"
            )
        if name not in REQUIRED_FILES and name not in OPTIONAL_FILES:
            raise InvalidAdapter(f"unexpected file '{name}'; an adapter may contain only: {allowed}")
        files.append(entry)
    present = {f.name for f in files}
    for name in REQUIRED_FILES:
        if name not in present:
            raise InvalidAdapter(f"missing {name}; a PEFT LoRA adapter has {' and '.join(REQUIRED_FILES)}")
    return files


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidAdapter(f"{path.name} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise InvalidAdapter(f"{path.name} must hold a JSON object")
    return data


def _read_manifest(path: Path) -> Mapping[str, Any] | None:
    return MappingProxyType(_read_json(path)) if path.exists() else None


def _check_config(config: Mapping[str, Any], max_lora_rank: int) -> tuple[int, dict[str, int]]:
    """The config's refusals; returns ``r`` and ``rank_pattern``."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise InvalidAdapter(
            f"peft_type {peft_type!r} is not supported; only LORA adapters can be served", param="peft_type"
        )
    if config.get("use_dora"):
        raise InvalidAdapter("DoRA adapters (use_dora: true) are not supported by vLLM", param="use_dora")
    if config.get("modules_to_save"):
        raise InvalidAdapter(
            f"modules_to_save {config['modules_to_save']!r} is not supported; "
            "vLLM serves only LoRA weights, not fully trained modules",
            param="modules_to_save",
        )
    bias = config.get("bias", "none")
    if bias != "none":
        raise InvalidAdapter(f"bias {bias!r} is not supported; vLLM needs bias 'none'", param="bias")
    if config.get("lora_bias"):
        raise InvalidAdapter("lora_bias: true is not supported; vLLM serves LoRA without bias", param="lora_bias")
    alpha = config.get("lora_alpha", 8)
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise InvalidAdapter(f"lora_alpha must be a number, got {alpha!r}", param="lora_alpha")
    r = _check_rank(config.get("r"), max_lora_rank, "r", param="r")
    raw_pattern = config.get("rank_pattern") or {}
    if not isinstance(raw_pattern, dict):
        raise InvalidAdapter("rank_pattern must be a JSON object", param="rank_pattern")
    rank_pattern: dict[str, int] = {}
    for pattern, value in raw_pattern.items():
        try:
            re.compile(pattern)
        except re.error as e:
            raise InvalidAdapter(
                f"rank_pattern key {pattern!r} is not a valid pattern: {e}", param="rank_pattern"
            ) from e
        rank_pattern[pattern] = _check_rank(value, max_lora_rank, f"rank_pattern[{pattern!r}]", param="rank_pattern")
    return r, rank_pattern


def _check_rank(value: object, max_lora_rank: int, what: str, *, param: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InvalidAdapter(f"{what} must be a positive integer, got {value!r}", param=param)
    if value > max_lora_rank:
        raise InvalidAdapter(f"{what} = {value} is above this server's max LoRA rank {max_lora_rank}", param=param)
    return value


def _module_rank(module: str, r: int, rank_pattern: Mapping[str, int]) -> int:
    """PEFT's rule (``peft.utils.other.get_pattern_key``): the first pattern matching a suffix wins."""
    for pattern, rank in rank_pattern.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return rank
    return r


def _check_weights(
    path: Path, base: BaseModelSpec | None, r: int, rank_pattern: Mapping[str, int]
) -> tuple[dict[str, int], int]:
    """Key names, A/B pairing, shapes against the base, and values; returns each module's rank."""
    with path.open("rb") as file:
        try:
            tensors = read_header_from(file, path.stat().st_size)
        except TensorFileError as e:
            raise InvalidAdapter(f"{WEIGHTS_FILE} is not a readable safetensors file: {e}") from e
        halves, others = _pair_keys(list(tensors))
        # Say "LoRA on the LM head" before "stray lm_head weight": PEFT saves both for such a target.
        for module in sorted(halves):
            _check_target(module, base)
        if others:
            raise InvalidAdapter(_unexpected_tensor(others[0]))
        if not halves:
            raise InvalidAdapter(f"{WEIGHTS_FILE} holds no LoRA tensors")
        ranks: dict[str, int] = {}
        for module, pair in sorted(halves.items()):
            for half in ("A", "B"):
                if half not in pair:
                    raise InvalidAdapter(f"layer '{module}' has no lora_{half} tensor")
            rank = _module_rank(module, r, rank_pattern)
            a, b = tensors[pair["A"]], tensors[pair["B"]]
            for tensor in (a, b):
                if len(tensor.shape) != 2 or 0 in tensor.shape:
                    raise InvalidAdapter(
                        f"tensor '{tensor.name}' has shape {list(tensor.shape)}; LoRA weights are matrices"
                    )
            in_features, out_features = base.linear_shapes[module] if base else (a.shape[1], b.shape[0])
            for tensor, expected in ((a, (rank, in_features)), (b, (out_features, rank))):
                if tensor.shape != expected:
                    raise InvalidAdapter(
                        f"tensor '{tensor.name}' has shape {list(tensor.shape)}, expected {list(expected)} "
                        f"(rank {rank}, layer '{module}')"
                    )
                _check_values(file, tensor)
            ranks[module] = rank
    return ranks, len(tensors)


def _pair_keys(keys: list[str]) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Group LoRA tensor names by module (``{module: {"A": key, "B": key}}``) and list the rest.

    Bias, DoRA and embedding-LoRA tensors are refused here, by name.
    """
    halves: dict[str, dict[str, str]] = {}
    others: list[str] = []
    for key in sorted(keys):
        if key.endswith(".bias"):
            raise InvalidAdapter(f"tensor '{key}' is a bias; vLLM serves LoRA adapters without bias weights")
        if "lora_embedding_" in key:
            raise InvalidAdapter(f"tensor '{key}' is a LoRA on an embedding; {_DECODER_ONLY}")
        if "lora_magnitude_vector" in key:
            raise InvalidAdapter(f"tensor '{key}' is a DoRA magnitude; DoRA adapters are not supported by vLLM")
        match = _LORA_KEY.fullmatch(key)
        if match is None:
            others.append(key)
        else:
            halves.setdefault(match["module"], {})[match["half"]] = key
    return halves, others


def _unexpected_tensor(key: str) -> str:
    if "lora_" not in key and key.endswith(".weight"):
        return (
            f"tensor '{key}' is a full base-model weight (saved by modules_to_save or save_embedding_layers); "
            "an adapter here holds LoRA weights only"
        )
    return f"unexpected tensor '{key}'; expected base_model.model.<module>.lora_A.weight / lora_B.weight"


def _check_target(module: str, base: BaseModelSpec | None) -> None:
    leaf = module.rsplit(".", 1)[-1]
    # Without a base spec, the usual names; with one, the model's own embedding modules.
    is_embedding = module in base.embedding_modules if base is not None else leaf in EMBEDDING_LEAVES
    if is_embedding:
        raise InvalidAdapter(f"layer '{module}' is an embedding or the LM head; {_DECODER_ONLY}")
    if base is not None and module not in base.linear_shapes:
        raise InvalidAdapter(f"layer '{module}' does not exist in base model {base.architecture}")


def _check_values(file: BinaryIO, tensor: TensorEntry) -> None:
    dtype = DTYPES[tensor.dtype]
    if not dtype.floating:
        # torch's name for the dtype: what a user of PEFT knows it as.
        raise InvalidAdapter(
            f"tensor '{tensor.name}' has dtype {dtype.torch_name}; LoRA weights must be floating point"
        )
    bad = count_nonfinite(file, tensor)
    if bad:
        raise InvalidAdapter(f"tensor '{tensor.name}' has {bad} non-finite values (NaN or inf)")
