"""The tests' import guard: torch and the libraries built on it, refused in a process that must never import them.

A Python process started with this directory on ``PYTHONPATH`` and ``QUIVER_TEST_IMPORT_GUARD`` set to a file
path refuses to import any of ``FORBIDDEN`` (an ImportError, as in an install without them), and appends each
attempt, with the stack that made it, to that file: an attempt the code caught and turned into an error answer
still shows there. The variable leaves the environment at once, so the processes this one starts (the fine-tuning
workers, which train with torch) run unguarded.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType

FORBIDDEN = ("torch", "transformers", "peft", "trl", "sentence_transformers")
VARIABLE = "QUIVER_TEST_IMPORT_GUARD"
# Each attempt in the log starts with this, then the module's name and the process id.
MARK = "refused import of "


class Forbid:
    """The first finder on ``sys.meta_path``: records and refuses the forbidden imports, passes on the rest."""

    def __init__(self, log_path: str) -> None:
        self.log_path = log_path

    def find_spec(
        self, name: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if name.partition(".")[0] not in FORBIDDEN:
            return None
        stack = "".join(traceback.format_stack()[:-1])
        with open(self.log_path, "a", encoding="utf-8") as log:
            log.write(f"{MARK}{name} in pid {os.getpid()}\n{stack}\n")
        raise ImportError(f"{name} imported in a process that must not import it")


def install() -> None:
    """Guard this process when the variable names a log, and take the variable away from its children."""
    log_path = os.environ.pop(VARIABLE, None)
    if log_path:
        sys.meta_path.insert(0, Forbid(log_path))


install()
