"""Quiver + vLLM against naive serving: one transformers + PEFT process, one request at a time.

The naive server is what a team writes first: the base model and every adapter in one ``PeftModel``
(``load_adapter`` under each model name), and per request ``set_adapter`` (adapters off for the base),
the tokenizer's chat template, greedy ``generate``. No batching: requests wait their turn. It speaks
enough of the OpenAI API for the benchmark's driver (chat completions, plain or streamed, with usage),
and honours vLLM's ``ignore_eos`` with ``min_new_tokens``, so both sides write the same number of tokens.

Run: ``python -m loadtest.naive --base DIR --adapter NAME=DIR ... --port P``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio.to_thread
from rich.console import Console
from rich.table import Table
from starlette.applications import Starlette
from starlette.concurrency import iterate_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from core import benchmarks, processes
from loadtest.routing import Run, compare_placement, drive

DEFAULT_MAX_TOKENS = 16
TARGET_RATIO = 5.0
HEADING = "Quiver vs naive transformers + PEFT"


@dataclass(frozen=True)
class Generation:
    """What one request asks for, read from its OpenAI body."""

    model: str
    messages: list[dict[str, Any]]
    max_tokens: int
    ignore_eos: bool
    stream: bool
    include_usage: bool

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Generation:
        """The request in ``body``; ValueError says what is wrong."""
        messages = body.get("messages")
        if not isinstance(body.get("model"), str) or not isinstance(messages, list) or not messages:
            raise ValueError("a chat completion needs a model and a non-empty list of messages")
        given = [body.get(key) for key in ("max_completion_tokens", "max_tokens")]
        max_tokens = next((value for value in given if value is not None), DEFAULT_MAX_TOKENS)
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        options = body.get("stream_options") or {}
        return cls(
            model=body["model"],
            messages=messages,
            max_tokens=max_tokens,
            ignore_eos=bool(body.get("ignore_eos")),
            stream=bool(body.get("stream")),
            include_usage=bool(options.get("include_usage")),
        )


class NaiveModel:
    """The base model with every adapter loaded into one ``PeftModel``; serves one generation at a time."""

    def __init__(self, base_dir: Path, adapters: Mapping[str, Path], served_name: str) -> None:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not adapters:
            raise ValueError("the naive server needs at least one adapter")
        torch.set_num_threads(os.cpu_count() or 1)
        self.served_name = served_name
        self.tokenizer = AutoTokenizer.from_pretrained(base_dir)
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto")  # the checkpoint's, as vLLM serves it
        # On the GPU where vLLM runs (quiver bench --gpu), the naive side runs there too.
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        base.to(self.device)  # type: ignore[arg-type]  # transformers types .to() too narrowly
        # PEFT keeps adapters in ModuleDicts, whose keys may not hold '.', so each gets a plain slot name.
        self.slots = {name: f"adapter_{i}" for i, name in enumerate(adapters)}
        first, *rest = adapters.items()
        self.model = PeftModel.from_pretrained(base, str(first[1]), adapter_name=self.slots[first[0]])
        for name, directory in rest:
            self.model.load_adapter(str(directory), adapter_name=self.slots[name])
        self.model.eval()
        self.lock = asyncio.Lock()

    @property
    def names(self) -> list[str]:
        """Every model name served: the base's, then the adapters'."""
        return [self.served_name, *self.slots]

    def generate(self, request: Generation, streamer: Any = None) -> tuple[int, list[int]]:
        """Greedy generation for ``request`` (text to ``streamer`` as it comes): prompt tokens, completion ids."""
        import torch

        encoded: Any = self.tokenizer.apply_chat_template(
            request.messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        ids = encoded["input_ids"].to(self.device)
        options = {
            "max_new_tokens": request.max_tokens,
            "min_new_tokens": request.max_tokens if request.ignore_eos else None,
            "do_sample": False,
            "streamer": streamer,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        try:
            with torch.inference_mode():
                if request.model == self.served_name:
                    with self.model.disable_adapter():
                        output = self.model.generate(input_ids=ids, **options)  # type: ignore[no-untyped-call]
                else:
                    self.model.set_adapter(self.slots[request.model])
                    output = self.model.generate(input_ids=ids, **options)  # type: ignore[no-untyped-call]
        except BaseException:
            if streamer is not None:
                streamer.end()  # or the reader waits for text forever
            raise
        return int(ids.shape[1]), output[0, ids.shape[1] :].tolist()


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _finish(generation: Generation, completion: list[int]) -> str:
    return "length" if len(completion) >= generation.max_tokens else "stop"


def _error(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}},
                        status_code=status)  # fmt: skip


def create_app(model: NaiveModel) -> Starlette:
    """The naive server's HTTP API over ``model``."""

    async def chat(request: Request) -> Response:
        try:
            generation = Generation.from_body(json.loads(await request.body()))
        except (ValueError, AttributeError) as exc:
            return _error(400, str(exc), "invalid_request")
        if generation.model not in model.names:
            return _error(404, f"The model `{generation.model}` does not exist.", "model_not_found")
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": generation.model}
        if generation.stream:
            return StreamingResponse(_stream(model, generation, head), media_type="text/event-stream")
        async with model.lock:
            prompt, completion = await anyio.to_thread.run_sync(model.generate, generation)
        text = model.tokenizer.decode(completion, skip_special_tokens=True)
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": _finish(generation, completion),
        }
        body = {**head, "object": "chat.completion", "choices": [choice], "usage": _usage(prompt, len(completion))}
        return JSONResponse(body)

    async def models(request: Request) -> JSONResponse:
        cards = [{"id": name, "object": "model", "created": 0, "owned_by": "naive"} for name in model.names]
        return JSONResponse({"object": "list", "data": cards})

    async def health(request: Request) -> PlainTextResponse:
        return PlainTextResponse("")

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/models", models),
            Route("/health", health),
        ]
    )


async def _stream(model: NaiveModel, generation: Generation, head: dict[str, Any]) -> AsyncIterator[bytes]:
    from transformers import TextIteratorStreamer

    def event(payload: dict[str, Any]) -> bytes:
        return f"data: {json.dumps({**head, 'object': 'chat.completion.chunk', **payload})}\n\n".encode()

    async with model.lock:
        streamer = TextIteratorStreamer(model.tokenizer, skip_prompt=True, skip_special_tokens=True)
        task = asyncio.create_task(anyio.to_thread.run_sync(model.generate, generation, streamer))
        async for text in iterate_in_threadpool(streamer):
            if text:
                yield event({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]})
        prompt, completion = await task
    yield event({"choices": [{"index": 0, "delta": {}, "finish_reason": _finish(generation, completion)}]})
    if generation.include_usage:
        yield event({"choices": [], "usage": _usage(prompt, len(completion))})
    yield b"data: [DONE]\n\n"


def start(stack: ExitStack, base_dir: Path, adapters: Mapping[str, Path], work: Path, served_name: str = "base") -> str:
    """Run the naive server in a process of its own on a free port until ``stack`` closes; its URL."""
    port = processes.free_port()
    url = f"http://127.0.0.1:{port}"
    args = [sys.executable, "-m", "loadtest.naive", "--base", str(base_dir), "--port", str(port),
            "--served-name", served_name, *(f"--adapter={name}={path}" for name, path in adapters.items())]  # fmt: skip
    stack.enter_context(processes.serving("the naive server", args, work / "naive.log", f"{url}/health"))
    return url


# -- the comparison ------------------------------------------------------------------------------


@dataclass
class Side:
    """What one side did over all its rounds."""

    tokens_per_s: float
    ttft_p50_ms: float
    tokens: int
    errors: int

    @classmethod
    def of(cls, run: Run) -> Side:
        return cls(round(run.tokens_per_s, 2), round(run.ttft_p50_ms(), 1), run.tokens, run.errors)


@dataclass
class Row:
    """Quiver + vLLM and the naive server over the same requests."""

    adapters: int
    rounds: int
    requests: int
    concurrency: int
    max_tokens: int
    quiver: Side
    naive: Side

    @property
    def ratio(self) -> float:
        """Quiver's completion tokens/s over the naive server's."""
        return self.quiver.tokens_per_s / self.naive.tokens_per_s if self.naive.tokens_per_s else 0.0

    @property
    def errors(self) -> int:
        return self.quiver.errors + self.naive.errors

    @property
    def met(self) -> bool:
        return self.ratio >= TARGET_RATIO and self.errors == 0

    def sides(self) -> list[tuple[str, Side]]:
        return [("Quiver + vLLM", self.quiver), ("naive transformers + PEFT", self.naive)]


async def compare_naive(
    gateway_url: str, naive_url: str, models: Sequence[str], *, rounds: int = 3, requests: int = 8,
    concurrency: int = 8, max_tokens: int = 32,
) -> Row:  # fmt: skip
    """Alternate rounds between the gateway and the naive server, the same Zipf sequence over ``models`` each round.

    Every answer is ``max_tokens`` long (``ignore_eos``), so both sides write the same number of tokens.
    """
    for url in (gateway_url, naive_url):  # adapters loaded into vLLM, first-call set-up on both sides
        await drive(url, list(models), 1, 2, Run())
    runs = await compare_placement(
        {"quiver": gateway_url, "naive": naive_url}, models, rounds=rounds, requests=requests,
        concurrency=concurrency, max_tokens=max_tokens, count_loads=False,
    )  # fmt: skip
    quiver, naive = Side.of(runs["quiver"]), Side.of(runs["naive"])
    return Row(len(set(models)), rounds, requests, concurrency, max_tokens, quiver, naive)


def run(
    base_dir: Path, adapters: Mapping[str, Path], gateway_url: str, work: Path, out_dir: Path, console: Console, *,
    served_name: str = "base", rounds: int = 3, requests: int = 8, concurrency: int = 8, max_tokens: int = 32,
) -> Row:  # fmt: skip
    """Start the naive server with ``adapters`` (gateway model name -> directory) and compare it with the gateway,
    whose registry serves the same adapters under the same names; prints and records."""
    options = {"rounds": rounds, "requests": requests, "concurrency": concurrency, "max_tokens": max_tokens}
    with ExitStack() as stack:
        with console.status(f"Starting the naive transformers + PEFT server with {len(adapters)} adapters"):
            naive_url = start(stack, base_dir, adapters, work, served_name)
        with console.status(f"Quiver vs naive: {rounds} alternating rounds of {requests} requests per side"):
            result = asyncio.run(compare_naive(gateway_url, naive_url, list(adapters), **options))
    report(result, out_dir, console)
    return result


# -- reporting -----------------------------------------------------------------------------------


def verdicts(result: Row) -> list[benchmarks.Verdict]:
    """Quiver's throughput over the naive server's."""
    errors = f", {result.errors} errors" if result.errors else ""
    return [
        benchmarks.Verdict(
            "Quiver + vLLM vs naive transformers + PEFT, tokens/s",
            f"{result.ratio:.2f}x{errors}",
            f">= {TARGET_RATIO:g}x",
            result.met,
        )
    ]


COLUMNS = ("served by", "tokens/s", "TTFT p50", "tokens", "errors")


def _cells(result: Row) -> list[tuple[str, ...]]:
    return [
        (label, f"{side.tokens_per_s:.1f}", f"{side.ttft_p50_ms:.0f} ms", str(side.tokens), str(side.errors))
        for label, side in result.sides()
    ]


def markdown(result: Row, now: datetime) -> str:
    """The section's body for BENCHMARKS.md."""
    r = result
    lines = [
        f"Measured on {now:%Y-%m-%d} ({os.cpu_count()} CPUs): the same streamed chat requests, Zipf popularity over "
        f"{r.adapters} adapters, {r.concurrency} in flight, {r.max_tokens} tokens per answer (`ignore_eos` on vLLM, "
        f"`min_new_tokens` on the naive side), {r.rounds} alternating rounds of {r.requests} requests per side. "
        "Naive: one process, transformers + PEFT on the CPU, every adapter loaded into one `PeftModel`, "
        "`set_adapter` and greedy `generate` per request, one request at a time (the others wait their turn, "
        "hence its time to first token).",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|---|---:|---:|---:|---:|",
        *("| " + " | ".join(cells) + " |" for cells in _cells(r)),
        "",
        f"Quiver / naive throughput: **{r.ratio:.2f}x** (target >= {TARGET_RATIO:g}x: {'met' if r.met else 'missed'}).",
    ]
    return "\n".join(lines) + "\n"


def report(result: Row, out_dir: Path, console: Console) -> Path:
    """Print the table and record the section (JSON, BENCHMARKS.md, the summary's verdict)."""
    table = Table(title=f"Quiver + vLLM vs naive transformers + PEFT (target: >= {TARGET_RATIO:g}x tokens/s)")
    for column in COLUMNS:
        table.add_column(column, justify="right")
    for cells in _cells(result):
        table.add_row(*cells)
    console.print(table)
    console.print(f"Quiver / naive: {result.ratio:.2f}x")
    now = datetime.now(UTC)
    results = {"naive": {**asdict(result), "ratio": round(result.ratio, 3)}}
    path = benchmarks.record(out_dir, results, HEADING, markdown(result, now), now, verdicts(result))
    console.print(f"wrote {path} and BENCHMARKS.md")
    return path


def run_standalone(base_dir: Path, out_dir: Path, console: Console, *, adapters: int = 4, **options: int) -> Row:
    """The comparison on its own: a vLLM with room for ``adapters`` new random adapters, a gateway, both pushed."""
    import tempfile

    from loadtest.bench import start_gateway
    from loadtest.fixtures import make_adapters, push
    from loadtest.routing import ready_vllm

    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="quiver-bench-naive-") as tmp:
        work = Path(tmp)
        directories = make_adapters(base_dir, work, adapters, 8, console)
        with console.status("Starting vLLM and the gateway"):
            vllm_url = ready_vllm(stack, base_dir, work, "pool", slots=adapters)
            env = {"QUIVER_MAX_LORAS": str(adapters), "QUIVER_FINE_TUNING_WORKERS": "0"}
            gateway = start_gateway(stack, vllm_url, work, "naive", env)
        names = {f"naive-{i}@v1": directory for i, directory in enumerate(directories)}
        for name, directory in names.items():
            push(gateway, name.partition("@")[0], directory)
        return run(base_dir, names, gateway, work, out_dir, console, **options)  # type: ignore[arg-type]


def main() -> None:
    """Serve the naive server (see the module's docstring)."""
    import uvicorn

    parser = argparse.ArgumentParser(description="Naive OpenAI-shaped serving with transformers + PEFT.")
    parser.add_argument("--base", type=Path, required=True, help="base model directory")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="an adapter, repeatable")
    parser.add_argument("--served-name", default="base", help="the base model's name")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    adapters = dict(spec.split("=", 1) for spec in args.adapter)
    model = NaiveModel(args.base, {name: Path(path) for name, path in adapters.items()}, args.served_name)
    uvicorn.run(create_app(model), host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
