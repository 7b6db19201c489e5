"""Thread caps for the gateway process.

numpy's BLAS (OpenBLAS, MKL, OpenMP) starts a pool of one thread per core when it is loaded, and the
tokenizers library one more on its first batch. The gateway does small vector math and tokenizes one prompt at a
time between awaits: those pools only add threads, memory and contention with vLLM on the same cores. So the
gateway's entry point caps them, before numpy or tokenizers are imported, without overriding a value the user set.

The processes the gateway starts compute in earnest (vLLM, the fine-tuning workers): they get the environment
without the caps it set (``uncapped``), and with any the user set.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping

# Read when each library loads (the BLAS pools) or on first use (tokenizers' rayon pool, or none when not parallel).
CAPS = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAYON_NUM_THREADS": "1",
}
# The variables of CAPS this process set itself, comma-separated: what its children must not inherit.
CAPPED = "QUIVER_THREADS_CAPPED"


def cap(environ: MutableMapping[str, str] = os.environ) -> list[str]:
    """Set each cap the environment does not already set; the names set. Call it before numpy or tokenizers load."""
    already = set(environ.get(CAPPED, "").split(","))
    added = [name for name in CAPS if name not in environ]
    for name in added:
        environ[name] = CAPS[name]
    environ[CAPPED] = ",".join(sorted((already | set(added)) - {""}))
    return added


def uncapped(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` without the caps ``cap`` set (the user's own values stay): for a child process that computes."""
    ours = set(environ.get(CAPPED, "").split(",")) | {CAPPED}
    return {name: value for name, value in environ.items() if name not in ours}
