"""What the load-test scenarios need to know, without locust: names, settings, and what a target offers.

Both sides import this module: ``quiver loadtest`` (to check a scenario can run before starting locust)
and the locustfile (in its own process, where gevent has patched the standard library). So it uses the
standard library only.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Scenario name -> the locustfile's User classes that make it (locust selects classes by name).
SCENARIOS: Mapping[str, tuple[str, ...]] = {
    "base": ("BaseUser",),
    "adapter": ("AdapterUser",),
    "churn": ("ChurnUser",),
    "streaming": ("StreamingUser",),
    "hotswap": ("HotswapUser", "HotswapPusher"),
    "mixed": ("MixedUser",),
}

# How `quiver loadtest` passes its options to the locust process.
ENV_MAX_TOKENS = "QUIVER_LOADTEST_MAX_TOKENS"
ENV_PUSH_DIR = "QUIVER_LOADTEST_PUSH_DIR"
ENV_RAG = "QUIVER_LOADTEST_RAG"
DEFAULT_MAX_TOKENS = 16

AUTO = "auto"
RAG_PREFIX = "rag:"
HOTSWAP_ALIAS = "live"
# Popularity of the n-th most popular adapter version in `churn` is proportional to 1 / n**s.
ZIPF_S = 1.1


@dataclass(frozen=True)
class Options:
    """The scenario settings `quiver loadtest` hands to the locust process through the environment."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    push_dir: Path | None = None
    rag: tuple[str, ...] = ()

    def to_env(self) -> dict[str, str]:
        """The environment variables that carry these options."""
        env = {ENV_MAX_TOKENS: str(self.max_tokens), ENV_RAG: ",".join(self.rag)}
        if self.push_dir is not None:
            env[ENV_PUSH_DIR] = str(self.push_dir)
        return env

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Options:
        """Read them back in the locust process."""
        push_dir = env.get(ENV_PUSH_DIR)
        return cls(
            max_tokens=int(env.get(ENV_MAX_TOKENS) or DEFAULT_MAX_TOKENS),
            push_dir=Path(push_dir) if push_dir else None,
            rag=tuple(c for c in env.get(ENV_RAG, "").split(",") if c),
        )


@dataclass(frozen=True)
class Offer:
    """The model strings a target answers to, by kind, as its ``GET /v1/models`` lists them.

    ``gateway`` is whether the target is a Quiver gateway (it has the registry API), which is what
    makes ``auto`` and the hot-swap scenario possible; ``described`` whether any adapter has a
    description or example prompts for ``auto`` to match.
    """

    base: str | None
    adapters: tuple[str, ...]
    versions: tuple[str, ...]
    rag: tuple[str, ...]
    gateway: bool
    described: bool = False

    @classmethod
    def parse(cls, models: Mapping[str, Any], adapters: Mapping[str, Any] | None, rag: Sequence[str] = ()) -> Offer:
        """From the bodies of ``GET /v1/models`` and ``GET /v1/adapters`` (None: not a Quiver gateway)."""
        ids = [(str(card["id"]), card.get("parent")) for card in models.get("data", [])]
        listed_rag = [i for i, _ in ids if i.startswith(RAG_PREFIX)]
        base = [i for i, parent in ids if not parent and not i.startswith(RAG_PREFIX)]
        adapter_ids = [i for i, parent in ids if parent and not i.startswith(RAG_PREFIX)]
        routing = [a.get("routing") or {} for a in (adapters or {}).get("data", [])]
        return cls(
            base=base[0] if base else None,
            adapters=tuple(i for i in adapter_ids if "@" not in i),
            versions=tuple(i for i in adapter_ids if _is_version(i)),
            # Collections named with --rag replace the listed ones: a run can aim at one collection.
            rag=tuple(f"{RAG_PREFIX}{c}" for c in rag) if rag else tuple(listed_rag),
            gateway=adapters is not None,
            described=any(r.get("description") or r.get("examples") for r in routing),
        )

    def missing(self, scenario: str) -> str | None:
        """Why ``scenario`` cannot run against this target, or None when it can."""
        push = "push one with `quiver adapters push DIR --name NAME`"
        if self.base is None:
            return "the target lists no base model in GET /v1/models"
        if scenario in ("adapter", "hotswap") and not self.adapters:
            return f"scenario '{scenario}' needs an adapter and the target lists none; {push}"
        if scenario == "churn" and not self.versions:
            return f"scenario 'churn' needs adapter versions (name@vN) and the target lists none; {push}"
        if scenario == "hotswap" and not self.gateway:
            return "scenario 'hotswap' moves aliases through the registry API (/v1/adapters), which the target lacks"
        if scenario == "mixed" and not self.mix():
            return "scenario 'mixed' found nothing to mix: no adapter, no auto, no RAG collection"
        return None

    def notes(self, scenario: str, options: Options) -> list[str]:
        """What a scenario leaves out or does differently against this target, said once at the start."""
        notes: list[str] = []
        if scenario == "churn":
            notes.append(f"churn: {len(self.versions)} adapter versions, Zipf popularity (s={ZIPF_S})")
        if scenario == "streaming":
            notes.append(f"streaming: on {self.streamed}")
        if scenario == "hotswap" and options.push_dir is None:
            notes.append(
                "hotswap: no --push-dir, so no new versions are pushed; "
                f"the alias only moves among the versions of {self.adapters[0]} and back"
            )
        if scenario == "mixed":
            if not self.adapters:
                notes.append("mixed: the target lists no adapter; adapters left out of the mix")
            if not self.gateway:
                notes.append("mixed: the target is not a Quiver gateway; auto left out of the mix")
            elif not self.described:
                notes.append("mixed: no adapter has a description or examples, so auto answers from its default")
            if not self.rag:
                notes.append("mixed: no rag:COLLECTION listed or given with --rag; rag left out of the mix")
        return notes

    @property
    def streamed(self) -> str:
        """The model the streaming scenario uses: the first adapter, else the base."""
        return self.adapters[0] if self.adapters else str(self.base)

    def numbers(self, name: str) -> list[int]:
        """The version numbers of adapter ``name``."""
        return [int(v.rpartition("@v")[2]) for v in self.versions if v.partition("@")[0] == name]

    def mix(self) -> list[str]:
        """What `mixed` cycles through: an adapter, auto, a collection; then again with the next adapter and
        collection. Each kind the target offers gets an equal share."""
        kinds = [k for k in (self.adapters, (AUTO,) if self.gateway else (), self.rag) if k]
        rounds = max((len(k) for k in kinds), default=0)
        return [kind[i % len(kind)] for i in range(rounds) for kind in kinds]


def _is_version(model_id: str) -> bool:
    _, _, ref = model_id.partition("@")
    return ref[:1] == "v" and ref[1:].isdigit()


def zipf_weights(n: int, s: float = ZIPF_S) -> list[float]:
    """Relative popularity of ``n`` items, the first most popular: the k-th (from 1) gets ``1 / k**s``."""
    return [1 / (k + 1) ** s for k in range(n)]


def fetch_offer(host: str, rag: Sequence[str] = (), timeout_s: float = 10.0) -> Offer:
    """Ask a target what it offers; OSError (URLError among them) when it cannot be reached, ValueError for
    a body that is not the JSON of a model list."""
    models = _get_json(f"{host}/v1/models", timeout_s)
    try:
        adapters: dict[str, Any] | None = _get_json(f"{host}/v1/adapters", timeout_s)
    except urllib.error.HTTPError:
        adapters = None  # vLLM direct, or another OpenAI server: no registry API
    try:
        return Offer.parse(models, adapters, rag)
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"GET /v1/models answered an unexpected body ({exc!r})") from None


def _get_json(url: str, timeout_s: float) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        body: dict[str, Any] = json.load(response)
    return body
