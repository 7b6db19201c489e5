"""Test adapters and archives, good and bad, built with real PEFT.

Every builder takes either a model directory or an ``nn.Module``, so unit tests use the tiny Llama
below and integration tests the real base model. Bad variants copy a good adapter and break one thing.
"""

from __future__ import annotations

import gzip
import io
import json
import shutil
import tarfile
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from rich.console import Console
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from adapters import BaseModelSpec
from training.config import TrainConfig
from training.synthetic import random_lora

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


# -- models -------------------------------------------------------------------------------------


def tiny_llama_config() -> LlamaConfig:
    """A two-layer Llama with grouped-query attention, so q/k/v/o and MLP shapes all differ."""
    return LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )


def tiny_llama_model(seed: int = 0, config: LlamaConfig | None = None) -> LlamaForCausalLM:
    """The tiny Llama (or ``config``'s Llama) with weights drawn from ``seed``, in float32 on the CPU."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config or tiny_llama_config())  # type: ignore[no-untyped-call]
    model.train(False)
    return model


def save_tiny_llama(out: Path, *, seed: int = 0, max_shard_size: str | None = None, **config_changes: Any) -> Path:
    """The tiny Llama saved in ``out`` as a base model directory (``config.json``, safetensors weights).

    ``config_changes`` edit its config (``tie_word_embeddings=False``); ``max_shard_size`` shards the weights.
    """
    config = tiny_llama_config()
    for key, value in config_changes.items():
        setattr(config, key, value)
    options = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
    tiny_llama_model(seed, config).save_pretrained(out, **options)
    return out


def meta_device_spec(model_dir: Path, name: str) -> BaseModelSpec:
    """The reference for ``BaseModelSpec.from_model_dir`` (how it was read before it read safetensors headers):
    the model transformers builds from ``config.json`` on the meta device, and its ``nn.Linear`` layers."""
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    embeddings = {id(model.get_input_embeddings()), id(model.get_output_embeddings())}
    linear_shapes: dict[str, tuple[int, int]] = {}
    embedding_modules: set[str] = set()
    for module_name, module in model.named_modules():
        if id(module) in embeddings:
            embedding_modules.add(module_name)
        if isinstance(module, torch.nn.Linear):
            linear_shapes[module_name] = (module.in_features, module.out_features)
    architectures = getattr(config, "architectures", None) or [type(model).__name__]
    return BaseModelSpec(
        name=name,
        linear_shapes=MappingProxyType(linear_shapes),
        architecture=str(architectures[0]),
        embedding_modules=frozenset(embedding_modules),
    )


# -- adapters -----------------------------------------------------------------------------------


def make_lora_adapter(
    base: Path | str | torch.nn.Module,
    out_dir: Path,
    *,
    rank: int = 8,
    alpha: int = 16,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
    seed: int = 0,
    scale: float = 0.2,
    rank_pattern: Mapping[str, int] | None = None,
    base_model_name_or_path: str | None = None,
) -> Path:
    """A real PEFT LoRA adapter for ``base`` in ``out_dir`` whose random weights change greedy output."""
    random_lora(
        base,
        out_dir,
        rank=rank,
        alpha=alpha,
        target_modules=target_modules,
        seed=seed,
        scale=scale,
        rank_pattern=rank_pattern,
    )
    if base_model_name_or_path is not None:
        edit_config(out_dir, base_model_name_or_path=base_model_name_or_path)
    return out_dir


def read_config(adapter_dir: Path) -> dict[str, Any]:
    """The adapter's ``adapter_config.json``."""
    config: dict[str, Any] = json.loads((adapter_dir / CONFIG).read_text())
    return config


def edit_config(adapter_dir: Path, **changes: Any) -> Path:
    """Set keys of ``adapter_config.json`` in place."""
    config = read_config(adapter_dir)
    config.update(changes)
    (adapter_dir / CONFIG).write_text(json.dumps(config, indent=2))
    return adapter_dir


def edit_weights(adapter_dir: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """Load the adapter's tensors, let ``change`` edit the dict in place, and save them back."""
    path = adapter_dir / WEIGHTS
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return adapter_dir


def with_dtype(adapter_dir: Path, dtype: torch.dtype) -> Path:
    """Every tensor of the adapter converted to ``dtype`` in place (PEFT saves in the model's dtype)."""

    def convert(tensors: dict[str, torch.Tensor]) -> None:
        for key, tensor in tensors.items():
            tensors[key] = tensor.to(dtype)

    return edit_weights(adapter_dir, convert)


def copy_adapter(good: Path, out: Path) -> Path:
    """A writable copy of ``good`` at ``out``."""
    shutil.copytree(good, out)
    return out


# -- bad variants: each copies the good adapter to ``out`` and breaks one thing --------------------


def with_dora(good: Path, out: Path) -> Path:
    """``use_dora: true``."""
    return edit_config(copy_adapter(good, out), use_dora=True)


def with_modules_to_save(good: Path, out: Path) -> Path:
    """``modules_to_save: ["lm_head"]``."""
    return edit_config(copy_adapter(good, out), modules_to_save=["lm_head"])


def with_bias_config(good: Path, out: Path) -> Path:
    """``bias: "all"`` (bias training)."""
    return edit_config(copy_adapter(good, out), bias="all")


def with_bias_tensor(good: Path, out: Path) -> Path:
    """A ``lora_B.bias`` tensor, as PEFT's ``lora_bias=True`` saves, while the config looks clean."""

    def add_bias(tensors: dict[str, torch.Tensor]) -> None:
        key = next(k for k in sorted(tensors) if k.endswith("lora_B.weight"))
        tensors[key.replace(".weight", ".bias")] = torch.zeros(tensors[key].shape[0])

    return edit_weights(copy_adapter(good, out), add_bias)


def with_rank(good: Path, out: Path, rank: int = 64) -> Path:
    """Consistent config and tensors at ``rank`` (above the test servers' maximum by default)."""

    def resize(tensors: dict[str, torch.Tensor]) -> None:
        # Random values, as trained weights have: constant ones would compress like a decompression bomb.
        draw = torch.Generator().manual_seed(0)
        for key, tensor in tensors.items():
            shape = (rank, tensor.shape[1]) if ".lora_A." in key else (tensor.shape[0], rank)
            tensors[key] = (0.01 * torch.randn(shape, generator=draw)).to(tensor.dtype)

    adapter = edit_weights(copy_adapter(good, out), resize)
    return edit_config(adapter, r=rank, rank_pattern={})


def with_nan(good: Path, out: Path) -> Path:
    """One NaN in the first ``lora_A`` tensor."""

    def poison(tensors: dict[str, torch.Tensor]) -> None:
        key = next(k for k in sorted(tensors) if k.endswith("lora_A.weight"))
        tensors[key][0, 0] = float("nan")

    return edit_weights(copy_adapter(good, out), poison)


def with_wrong_shape(good: Path, out: Path) -> Path:
    """The first ``lora_B`` tensor one row too tall for its layer."""

    def stretch(tensors: dict[str, torch.Tensor]) -> None:
        key = next(k for k in sorted(tensors) if k.endswith("lora_B.weight"))
        rows, cols = tensors[key].shape
        tensors[key] = torch.zeros(rows + 1, cols, dtype=tensors[key].dtype)

    return edit_weights(copy_adapter(good, out), stretch)


def with_missing_layer(good: Path, out: Path) -> Path:
    """Layer 0's tensors renamed to layer 999, which no base model here has."""

    def rename(tensors: dict[str, torch.Tensor]) -> None:
        for key in [k for k in tensors if ".layers.0." in k]:
            tensors[key.replace(".layers.0.", ".layers.999.")] = tensors.pop(key)

    return edit_weights(copy_adapter(good, out), rename)


def with_pickle(good: Path, out: Path) -> Path:
    """The weights as a pickled ``adapter_model.bin`` instead of safetensors (PEFT's old format)."""
    adapter = copy_adapter(good, out)
    torch.save(load_file(adapter / WEIGHTS), adapter / "adapter_model.bin")
    (adapter / WEIGHTS).unlink()
    return adapter


def with_peft_type(good: Path, out: Path, peft_type: str = "IA3") -> Path:
    """A non-LoRA ``peft_type``."""
    return edit_config(copy_adapter(good, out), peft_type=peft_type)


# -- archives -----------------------------------------------------------------------------------


def tar_of(directory: Path, out: Path, *, top: str | None = "adapter", compress: bool = True) -> Path:
    """``directory``'s files as a tar (gzip-compressed by default), under ``top/`` unless None."""
    with tarfile.open(out, "w:gz" if compress else "w") as tar:
        if top:
            tar.add(directory, arcname=top)  # the directory entry first, then its files, as tar(1) does
        else:
            for path in sorted(directory.iterdir()):
                tar.add(path, arcname=path.name)
    return out


def zip_of(directory: Path, out: Path, *, top: str | None = "adapter") -> Path:
    """``directory``'s files as a deflated zip, under ``top/`` unless None."""
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(directory.iterdir()):
            zf.write(path, arcname=f"{top}/{path.name}" if top else path.name)
    return out


def tar_with(
    out: Path,
    files: Mapping[str, bytes] | Sequence[tuple[str, bytes]] = (),
    *,
    symlinks: Mapping[str, str] | None = None,
    hardlinks: Mapping[str, str] | None = None,
    fifos: Sequence[str] = (),
) -> Path:
    """A tar.gz with exactly these members, names taken as given (``/etc/x``, ``../x``, repeats included)."""
    with tarfile.open(out, "w:gz") as tar:
        for name, data in files.items() if isinstance(files, Mapping) else files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for kind, links in ((tarfile.SYMTYPE, symlinks or {}), (tarfile.LNKTYPE, hardlinks or {})):
            for name, target in links.items():
                info = tarfile.TarInfo(name)
                info.type = kind
                info.linkname = target
                tar.addfile(info)
        for name in fifos:
            info = tarfile.TarInfo(name)
            info.type = tarfile.FIFOTYPE
            tar.addfile(info)
    return out


def zip_with(out: Path, files: Mapping[str, bytes], *, symlinks: Mapping[str, str] | None = None) -> Path:
    """A zip with exactly these members; a symlink is stored the way Info-ZIP stores one."""
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o120777 << 16) | 0x20
            zf.writestr(info, target)
    return out


def traversal_tar(out: Path) -> Path:
    """A tar.gz whose member climbs out of the extraction directory."""
    return tar_with(out, {"adapter/../../escaped.txt": b"gotcha"})


def absolute_path_tar(out: Path) -> Path:
    """A tar.gz with an absolute member path."""
    return tar_with(out, {"/tmp/quiver-escaped.txt": b"gotcha"})


def symlink_tar(out: Path) -> Path:
    """A tar.gz whose config is a symlink to a file outside the archive."""
    return tar_with(out, symlinks={"adapter/adapter_config.json": "/etc/passwd"})


def zip_bomb(out: Path, size: int) -> Path:
    """A zip with one member of ``size`` zero bytes, which deflates to about a thousandth of that."""
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open("adapter/adapter_model.safetensors", "w", force_zip64=True) as member:
            chunk = bytes(1024 * 1024)
            for start in range(0, size, len(chunk)):
                member.write(chunk[: size - start])
    return out


def tar_bomb(out: Path, size: int, *, name: str = "adapter/adapter_model.safetensors", head: bytes = b"") -> Path:
    """A tar.gz with one member of ``size`` bytes, ``head`` then zeros: a few MB for gigabytes.

    Built from concatenated gzip members (valid gzip, as the format allows), so a gigabyte costs one
    compressed block repeated instead of a gigabyte compressed.
    """
    info = tarfile.TarInfo(name)
    info.size = size
    block = 16 * 1024 * 1024
    zeros = gzip.compress(bytes(block))
    body = size - len(head)
    padding = -size % tarfile.BLOCKSIZE
    with out.open("wb") as f:
        f.write(gzip.compress(info.tobuf(tarfile.GNU_FORMAT) + head))
        for _ in range(body // block):
            f.write(zeros)
        f.write(gzip.compress(bytes(body % block + padding + 2 * tarfile.BLOCKSIZE)))
    return out


def lying_zip(out: Path, real_size: int, declared_size: int) -> Path:
    """A zip whose member inflates to ``real_size`` bytes but declares ``declared_size`` in its headers."""
    zip_with(out, {"adapter/adapter_config.json": bytes(real_size)})
    data = bytearray(out.read_bytes())
    real = real_size.to_bytes(4, "little")
    declared = declared_size.to_bytes(4, "little")
    # The uncompressed size sits at offset 22 of the local header and 24 of the central directory entry.
    local = data.find(b"PK\x03\x04")
    central = data.find(b"PK\x01\x02")
    for offset in (local + 22, central + 24):
        assert data[offset : offset + 4] == real
        data[offset : offset + 4] = declared
    out.write_bytes(bytes(data))
    return out


# -- training -----------------------------------------------------------------------------------

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "quiver_manifest.json"}
TRAIN_MAX_STEPS = 8
TRAIN_SAVE_STEPS = 4


def make_tiny_base(base_model_dir: Path, out: Path) -> Path:
    """A two-layer Llama with SmolLM2's vocabulary (so its tokenizer and chat template), saved like a base model.

    Weights are drawn wider than Llama's default (std 0.2, not 0.02) so a few LoRA steps visibly move the loss.
    SmolLM2 pads with its EOS (pad_token_id 2 == eos_token_id 2); so does this model.
    """
    config = tiny_llama_config()
    config.vocab_size = 49152
    config.max_position_embeddings = 512
    config.initializer_range = 0.2
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)  # type: ignore[no-untyped-call]
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_model_dir).save_pretrained(out)
    return out


def quiet() -> Console:
    """A console that records what a person would see, without a terminal."""
    return Console(file=io.StringIO(), width=120)


def output_of(console: Console) -> str:
    assert isinstance(console.file, io.StringIO)
    return console.file.getvalue()


def train_config(base: Path, out: Path, **changes: Any) -> TrainConfig:
    """A fast, deterministic training config for a tiny base."""
    settings: dict[str, Any] = {
        "base_model": base,
        "output_dir": out,
        "rank": 8,
        "alpha": 16,
        "dropout": 0.0,
        "max_steps": TRAIN_MAX_STEPS,
        "lr": 1e-2,
        # Constant, so that a resumed run and an uninterrupted one take the very same steps.
        "lr_scheduler": "constant",
        "batch_size": 3,
        "logging_steps": 1,
        "save_steps": TRAIN_SAVE_STEPS,
        "max_lora_rank": 16,
    }
    return TrainConfig(**{**settings, **changes})


def chat_jsonl(n: int, seed: int = 0, *, system: bool = True) -> bytes:
    """``n`` distinct demo-task conversations (``training.demo``) as OpenAI chat JSON Lines.

    ``system=False`` leaves out the task's long system prompt, for tiny models that should train fast.
    """
    from training.demo import generate_examples

    records = (
        {"messages": [m.to_dict() for m in e.messages if system or m.role != "system"]}
        for e in generate_examples(n, seed)
    )
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def preference_jsonl(n: int) -> bytes:
    """``n`` preference pairs with distinct prompts, as JSON Lines (``prompt``/``chosen``/``rejected``)."""
    words = ("apple", "pear", "plum", "fig", "kiwi", "lime", "date", "lemon", "mango", "peach", "grape", "melon")
    records = ({"prompt": f"Say {w} twice", "chosen": f"{w} {w}", "rejected": "no"} for w in words[:n])
    return "".join(json.dumps(r) + "\n" for r in records).encode()
