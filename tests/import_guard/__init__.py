"""The import guard (``sitecustomize.py`` here) for processes the tests start: their environment, and what they tried.

This directory goes first on a process's ``PYTHONPATH``, so Python runs the guard at start-up; nothing else in it
is importable there.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from tests.import_guard.sitecustomize import FORBIDDEN, MARK, VARIABLE

DIRECTORY = Path(__file__).resolve().parent

__all__ = ["FORBIDDEN", "attempts", "environment"]


def environment(log_path: Path, base: Mapping[str, str] = os.environ) -> dict[str, str]:
    """``base`` with the guard on: a process started with it refuses ``FORBIDDEN`` and logs to ``log_path``."""
    path = [str(DIRECTORY), *filter(None, base.get("PYTHONPATH", "").split(os.pathsep))]
    return {**base, "PYTHONPATH": os.pathsep.join(path), VARIABLE: str(log_path)}


def attempts(log_path: Path, since: int = 0) -> list[str]:
    """The refused imports logged from byte ``since`` on, each with the stack that tried it."""
    try:
        with log_path.open(encoding="utf-8") as log:
            log.seek(since)
            text = log.read()
    except FileNotFoundError:
        return []
    return [MARK + entry for entry in text.split(MARK) if entry.strip()]
