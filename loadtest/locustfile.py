"""Locust scenarios over the OpenAI HTTP API; ``quiver loadtest --scenario NAME`` runs one.

Each scenario is one or more User classes (``loadtest.scenarios.SCENARIOS``). What the target offers is
read from its ``GET /v1/models`` once per run, at test start, and shared by every user. Any answer but
the expected status is a failure whose text is the error body's message. Streamed answers also report
time to first token and inter-token latency as request type ``METRIC``, names ``ttft`` and ``itl``.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import random
import tarfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gevent
import locust.stats
from locust import FastHttpUser, between, constant, events, task
from locust.contrib.fasthttp import ResponseContextManager
from locust.env import Environment

from loadtest.scenarios import HOTSWAP_ALIAS, Offer, Options, fetch_offer, zipf_weights

log = logging.getLogger("quiver.loadtest")

PROMPTS = (
    "My invoice shows the same charge twice. What should I do?",
    "How do I reset the password of my account?",
    "Translate 'see you tomorrow' into French.",
    "Write one sentence about a lighthouse.",
    "What is the capital of Japan?",
    "Summarise in five words: the meeting moved from Monday to Friday.",
)
# How long the hot-swap alias stays on a new version before it is rolled back.
SWAP_HOLD_S = 1.0


@dataclass(frozen=True)
class Setup:
    """What every user of one run shares: the target's offer and the options `quiver loadtest` passed."""

    offer: Offer
    options: Options
    live: int | None = None  # hotswap: the version NAME@live starts on, and returns to after each move


@events.test_start.add_listener  # type: ignore[untyped-decorator]  # locust's events are untyped
def read_target(environment: Environment, **_: Any) -> None:
    """Read what the target offers, check the selected scenarios can run on it, and prepare them."""
    options = Options.from_env(os.environ)
    host = (environment.host or "").rstrip("/")
    try:
        offer = fetch_offer(host, options.rag)
    except (OSError, ValueError) as exc:
        return abort(environment, f"cannot read {host}/v1/models: {exc}")
    scenarios = dict.fromkeys(cls.scenario for cls in environment.user_classes if issubclass(cls, OpenAIUser))
    for scenario in scenarios:
        why = offer.missing(scenario)
        if why is not None:
            return abort(environment, why)
        for note in offer.notes(scenario, options):
            log.info(note)
    live = None
    if "hotswap" in scenarios:
        try:
            live = start_alias(host, offer)
        except OSError as exc:
            return abort(environment, f"cannot point {offer.adapters[0]}@{HOTSWAP_ALIAS} at its latest version: {exc}")
    environment.quiver_setup = Setup(offer, options, live)  # type: ignore[attr-defined]


@events.quitting.add_listener  # type: ignore[untyped-decorator]
def last_csv_rows(environment: Environment, **_: Any) -> None:
    """Give locust's CSV writer one more turn: it rewrites the files every second, so without it the stats
    CSV would miss the last second and the requests that finished while users stopped."""
    if environment.parsed_options is not None and environment.parsed_options.csv_prefix:
        gevent.sleep(locust.stats.CSV_STATS_INTERVAL_SEC + 0.2)


def abort(environment: Environment, message: str) -> None:
    """End the run before any user starts, with exit code 2."""
    log.error(message)
    environment.process_exit_code = 2
    if environment.runner is not None:
        gevent.spawn(environment.runner.quit)


def start_alias(host: str, offer: Offer) -> int:
    """Point ``NAME@live`` at the latest version of the first adapter before any traffic asks for it."""
    name = offer.adapters[0]
    version = max(offer.numbers(name))
    request = urllib.request.Request(
        f"{host}/v1/adapters/{name}/aliases/{HOTSWAP_ALIAS}",
        data=json.dumps({"version": version}).encode(),
        method="PUT",
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30):
        pass
    log.info("hotswap: traffic on %s@%s, which starts at %s@v%d", name, HOTSWAP_ALIAS, name, version)
    return version


def error_text(response: ResponseContextManager) -> str:
    """The failure text of an unexpected answer: its status and the OpenAI error body's message."""
    status = response.status_code
    if not status:
        return f"no answer: {getattr(response, 'error', None)!r}"
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = (response.text or "")[:200]
    return f"{status}: {message}"


def settle(response: ResponseContextManager, expected: int = 200) -> bool:
    """Mark a response a success when it has the expected status, else a failure; True on success."""
    if response.status_code == expected:
        response.success()  # type: ignore[no-untyped-call]
        return True
    response.failure(error_text(response))  # type: ignore[no-untyped-call]
    return False


class OpenAIUser(FastHttpUser):
    """A client of the OpenAI API: each user sends its next request as soon as the last one is answered."""

    abstract = True
    wait_time = constant(0)
    scenario = ""

    def on_start(self) -> None:
        setup: Setup | None = getattr(self.environment, "quiver_setup", None)
        if setup is None:  # the run was aborted at test start and is quitting
            raise gevent.GreenletExit()  # ends this user quietly; StopUser here would log a traceback
        self.setup = setup

    def body(self, model: str, *, stream: bool = False) -> dict[str, Any]:
        """A short, greedy chat request."""
        return {
            "model": model,
            "messages": [{"role": "user", "content": random.choice(PROMPTS)}],
            "max_tokens": self.setup.options.max_tokens,
            "temperature": 0,
            "stream": stream,
        }

    def chat(self, model: str) -> None:
        """One chat completion, recorded under the model string."""
        with self.client.post("/v1/chat/completions", json=self.body(model), name=model, catch_response=True) as r:
            settle(r)


class BaseUser(OpenAIUser):
    """`base`: the base model only."""

    scenario = "base"

    @task
    def chat_base(self) -> None:
        self.chat(str(self.setup.offer.base))


class AdapterUser(OpenAIUser):
    """`adapter`: the first adapter only."""

    scenario = "adapter"

    @task
    def chat_adapter(self) -> None:
        self.chat(self.setup.offer.adapters[0])


class ChurnUser(OpenAIUser):
    """`churn`: every adapter version with Zipf popularity, so more versions are wanted than vLLM keeps loaded."""

    scenario = "churn"

    def on_start(self) -> None:
        super().on_start()
        self.weights = zipf_weights(len(self.setup.offer.versions))

    @task
    def chat_version(self) -> None:
        self.chat(random.choices(self.setup.offer.versions, weights=self.weights)[0])


class StreamingUser(OpenAIUser):
    """`streaming`: streamed chat; reports time to first token (``ttft``) and inter-token latency (``itl``)."""

    scenario = "streaming"

    @task
    def stream(self) -> None:
        model = self.setup.offer.streamed
        started = time.perf_counter()
        tokens: list[float] = []
        body = self.body(model, stream=True)
        with self.client.post(
            "/v1/chat/completions", json=body, name=f"{model} (stream)", stream=True, catch_response=True
        ) as response:
            if response.status_code != 200:
                settle(response)
                return
            try:
                for chunk in sse_chunks(response):
                    if any(c.get("delta", {}).get("content") for c in chunk.get("choices", ())):
                        tokens.append(time.perf_counter())
            except ValueError as exc:
                response.failure(f"malformed stream: {exc}")
                return
            # Locust stops the clock at the headers of a streamed response; the stream's end is the answer's.
            response.request_meta["response_time"] = (time.perf_counter() - started) * 1000
            if not tokens:
                response.failure("the stream carried no tokens")
                return
            response.success()
        self.metric("ttft", tokens[0] - started)
        for before, after in itertools.pairwise(tokens):
            self.metric("itl", after - before)

    def metric(self, name: str, seconds: float) -> None:
        """Report a measurement as a request of type METRIC, so it lands in the CSV and HTML stats."""
        events = self.environment.events
        events.request.fire(request_type="METRIC", name=name, response_time=seconds * 1000, response_length=0)


def sse_chunks(response: ResponseContextManager) -> Iterator[dict[str, Any]]:
    """The JSON chunks of a server-sent event stream, each as soon as its line arrives, up to ``[DONE]``."""
    # iter_content waits for whole fixed-size reads, which would bunch the tokens; readline returns per line.
    raw = response._response
    while raw is not None and (line := raw.readline(b"\n")):
        data = line.strip()
        if not data.startswith(b"data:"):
            continue
        data = data[len(b"data:") :].strip()
        if data == b"[DONE]":
            return
        yield json.loads(data)


class HotswapUser(OpenAIUser):
    """`hotswap`: traffic on the first adapter through ``NAME@live`` while `HotswapPusher` moves the alias."""

    scenario = "hotswap"

    @task
    def chat_live(self) -> None:
        self.chat(f"{self.setup.offer.adapters[0]}@{HOTSWAP_ALIAS}")


class HotswapPusher(OpenAIUser):
    """`hotswap`'s one admin: pushes a new version (``--push-dir``), moves ``live`` to it, rolls back.

    Without a push directory it moves the alias among the versions that exist. A version it pushed is
    deleted at the start of the next cycle (or at the end), once the alias has left it, so a long run
    does not fill the store.
    """

    scenario = "hotswap"
    fixed_count = 1
    wait_time = between(1, 2)

    def on_start(self) -> None:
        super().on_start()
        offer = self.setup.offer
        self.name = offer.adapters[0]
        assert self.setup.live is not None  # set at test start for hotswap
        self.stable = self.setup.live
        self.on = self.stable
        others = [n for n in offer.numbers(self.name) if n != self.stable]
        self.existing = itertools.cycle(others or [self.stable])
        self.pushed: list[int] = []

    @task
    def swap(self) -> None:
        self.retire()
        push_dir = self.setup.options.push_dir
        version = self.push(push_dir) if push_dir is not None else next(self.existing)
        if version is not None and self.move(version, "alias move"):
            gevent.sleep(SWAP_HOLD_S)
            self.move(self.stable, "alias rollback")

    def on_stop(self) -> None:
        if self.on != self.stable:
            self.move(self.stable, "alias rollback")
        self.retire()

    def push(self, directory: Path) -> int | None:
        """Upload the directory as a new version; its README names this push, so the content is new each time."""
        archive = gevent.get_hub().threadpool.apply(adapter_archive, (directory, uuid.uuid4().hex))
        body, content_type = multipart({"name": self.name}, ("file", f"{self.name}.tar.gz", archive))
        with self.client.post(
            "/v1/adapters",
            data=body,  # type: ignore[arg-type]  # FastHttpSession sends bytes as they are; its hint says str
            headers={"content-type": content_type},
            name="push",
            catch_response=True,
        ) as response:
            if not settle(response, 201):
                return None
            version: int = response.json()["version"]["version"]
        self.pushed.append(version)
        return version

    def move(self, version: int, what: str) -> bool:
        """Point the alias at ``version``."""
        path = f"/v1/adapters/{self.name}/aliases/{HOTSWAP_ALIAS}"
        with self.client.put(path, json={"version": version}, name=what, catch_response=True) as response:
            moved = settle(response)
        if moved:
            self.on = version
        return moved

    def retire(self) -> None:
        """Delete the versions this user pushed that the alias has left."""
        for version in [v for v in self.pushed if v != self.on]:
            path = f"/v1/adapters/{self.name}/versions/{version}"
            with self.client.delete(path, name="delete version", catch_response=True) as response:
                if settle(response, 204):
                    self.pushed.remove(version)


def adapter_archive(directory: Path, stamp: str) -> bytes:
    """A .tar.gz of an adapter directory whose README.md (an optional file, hashed like the rest) is ``stamp``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as tar:
        for path in sorted(p for p in directory.iterdir() if p.name != "README.md"):
            tar.add(path, arcname=path.name)
        readme = f"Pushed by quiver loadtest (hotswap): {stamp}\n".encode()
        info = tarfile.TarInfo("README.md")
        info.size, info.mtime = len(readme), int(time.time())
        tar.addfile(info, io.BytesIO(readme))
    return buffer.getvalue()


def multipart(fields: dict[str, str], file: tuple[str, str, bytes]) -> tuple[bytes, str]:
    """A multipart/form-data body with text ``fields`` and one file (field, filename, content); and its type."""
    boundary = uuid.uuid4().hex
    field, filename, content = file

    def part(disposition: str, body: bytes, content_type: str = "") -> bytes:
        head = f"--{boundary}\r\nContent-Disposition: form-data; {disposition}\r\n{content_type}\r\n"
        return head.encode() + body + b"\r\n"

    parts = [part(f'name="{k}"', v.encode()) for k, v in fields.items()]
    parts.append(part(f'name="{field}"; filename="{filename}"', content, "Content-Type: application/gzip\r\n"))
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class MixedUser(OpenAIUser):
    """`mixed`: adapters, ``auto`` and ``rag:COLLECTION`` in turn; the n-th user starts n places into the
    cycle, so as many users as kinds ask for every kind from their first request."""

    scenario = "mixed"
    started = itertools.count()

    def on_start(self) -> None:
        super().on_start()
        mix = self.setup.offer.mix()
        start = next(self.started) % len(mix)
        self.models = itertools.cycle(mix[start:] + mix[:start])

    @task
    def chat_next(self) -> None:
        self.chat(next(self.models))
