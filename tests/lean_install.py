"""The gateway-only install, for tests: a venv holding only the base dependencies of pyproject.toml (no torch), and
this checkout installed from a copy of its sources, as ``pip install .`` would, into a directory of the test's own.

Making the venv takes about half a minute, so it is cached under ``~/.cache/quiver/venvs`` (``QUIVER_CACHE_DIR``),
keyed by pyproject.toml and the Python version, and built beside its final place and renamed into it: a
concurrent builder's result is as good. The checkout is installed afresh for every test (seconds, with
``--no-deps``): the code under test is always this checkout's.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tomllib
import uuid
from dataclasses import dataclass
from pathlib import Path

from core import embedded

ROOT = Path(__file__).resolve().parents[1]
# Bump when the way the venv is built changes, so an older cached one is not reused.
LAYOUT = 1
COMPLETE = ".quiver-complete"


@dataclass(frozen=True)
class LeanInstall:
    """The venv's interpreter and the directory the checkout was installed into (its ``bin/quiver`` too)."""

    python: Path
    site: Path

    @property
    def quiver(self) -> Path:
        """The ``quiver`` console script, run by the venv's interpreter."""
        return self.site / "bin" / "quiver"

    def environment(self, **settings: str) -> dict[str, str]:
        """This process's environment for a command of the install: its code first, none of this checkout's, and
        none of this process's ``QUIVER_*`` settings but the cache (where the full install prepared the model)."""
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("QUIVER_")}
        cache = {"QUIVER_CACHE_DIR": str(embedded.cache_root())}
        return {**env, **cache, "PYTHONPATH": str(self.site), **settings}


def _pip(python: Path, *args: str, cache: Path) -> None:
    env = {**os.environ, "PIP_CACHE_DIR": str(cache / "pip-v1"), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", *args], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, f"pip install {' '.join(args)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"


def copy_sources(out: Path) -> Path:
    """What ``pip install .`` reads (pyproject.toml, README.md, the packages), copied: a build writes beside them."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    out.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, out / name)
    for package in project["tool"]["setuptools"]["packages"]["find"]["include"]:
        name = package.rstrip("*")
        shutil.copytree(ROOT / name, out / name, ignore=shutil.ignore_patterns("__pycache__"))
    return out


def gateway_venv(cache: Path | None = None) -> Path:
    """The cached venv with the base dependencies alone (built on first use); its directory."""
    cache = cache or embedded.cache_root()
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes())
    digest.update(f"{sys.version_info[:3]}-{LAYOUT}".encode())
    target = cache / "venvs" / f"gateway-{digest.hexdigest()[:16]}"
    if (target / COMPLETE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = target.parent / f".{target.name}-{uuid.uuid4().hex[:8]}"
    try:
        subprocess.run([sys.executable, "-m", "venv", str(work)], check=True, capture_output=True, timeout=300)
        python = work / "bin" / "python"
        # The project resolves its own dependencies, as a user's install would; then only they remain.
        sources = copy_sources(work / "src")
        _pip(python, str(sources), cache=cache)
        subprocess.run([str(python), "-m", "pip", "uninstall", "--yes", "--quiet", "quiver"], check=True, timeout=300)
        shutil.rmtree(sources)
        (work / COMPLETE).touch()
        try:
            work.rename(target)
        except OSError:  # a concurrent build finished first
            if not (target / COMPLETE).is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def install(out: Path, cache: Path | None = None) -> LeanInstall:
    """This checkout installed (no dependencies: the cached venv has them) into ``out/site``, in the lean venv."""
    cache = cache or embedded.cache_root()
    python = gateway_venv(cache) / "bin" / "python"
    site = out / "site"
    _pip(python, "--no-deps", "--target", str(site), str(copy_sources(out / "src")), cache=cache)
    return LeanInstall(python, site)
