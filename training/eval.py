"""The eval gate: an adapter against three baselines on a held-out test set, through the gateway.

Every system answers through the real serving path (the gateway, vLLM, the served chat template),
greedy, with the same test prompts:

- ``adapter``: the adapter version, with the test messages as they are;
- ``base_prompt``: the base model with the task's system prompt;
- ``few_shot``: the base model with the system prompt and ``k`` fixed training examples as turns;
- ``rag``: the base model with the system prompt and the ``k`` training examples most similar to
  the message (all-MiniLM-L6-v2), the most similar last.

The task metric comes from the dataset spec. A short general-knowledge probe (``training.probe``)
runs on the base and the adapter to show forgetting. The report is a plain JSON object that the
registry stores with the version and that the promotion gate reads (``adapters.promotion``).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import openai
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from core.errors import InvalidRequest, UpstreamError
from training.demo import score_json_fields
from training.probe import QUESTIONS, score_probe_answer
from trainingdata.formats import ChatExample, DataError, Message, load_examples

BASELINES = ("base_prompt", "few_shot", "rag")
SYSTEMS = ("adapter", *BASELINES)
SYSTEM_TITLES = {
    "adapter": "adapter",
    "base_prompt": "base + system prompt",
    "few_shot": "base + few-shot",
    "rag": "base + RAG",
}
DEFAULT_K = 3
# The promotion margin's default, in metric points (0-100).
DEFAULT_MARGIN = 5.0
REPORT_VERSION = 1
# Above this share of failed requests for any system the eval is refused rather than reported.
MAX_FAILED_SHARE = 0.05
# Probe answers are a word or a short sentence.
PROBE_MAX_TOKENS = 32


def score_exact_match(prediction: str, reference: str) -> float:
    """1.0 when the answer equals the reference, ignoring case and surrounding or repeated spaces."""
    return float(" ".join(prediction.split()).casefold() == " ".join(reference.split()).casefold())


def score_rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased whitespace tokens (longest common subsequence)."""
    got, want = prediction.casefold().split(), reference.casefold().split()
    if not got or not want:
        return float(got == want)
    previous = [0] * (len(want) + 1)
    for token in got:
        current = [0]
        for j, other in enumerate(want):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    common = previous[-1]
    if common == 0:
        return 0.0
    precision, recall = common / len(got), common / len(want)
    return 2 * precision * recall / (precision + recall)


METRICS: Mapping[str, Callable[[str, str], float]] = {
    "exact_match": score_exact_match,
    "json_field_accuracy": score_json_fields,
    "rouge_l": score_rouge_l,
}


@dataclass(frozen=True)
class TaskSpec:
    """What the dataset spec says about scoring: the metric and the system prompt the baselines get."""

    metric: str = "exact_match"
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise DataError(f"unknown metric {self.metric!r}; use one of {', '.join(METRICS)}")

    @classmethod
    def from_file(cls, path: Path) -> TaskSpec:
        """Read ``dataset_spec.json`` (``metric``, ``system_prompt``; other keys are ignored)."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: cannot read the dataset spec: {exc}") from None
        if not isinstance(data, dict):
            raise DataError(f"{path}: the dataset spec must be a JSON object")
        prompt = data.get("system_prompt")
        return cls(metric=str(data.get("metric", "exact_match")), system_prompt=prompt if prompt else None)


@dataclass(frozen=True)
class Case:
    """One test example split into what is asked and the reference answer."""

    system: str | None
    turns: tuple[Message, ...]
    reference: str

    @classmethod
    def from_example(cls, example: ChatExample) -> Case:
        *prompt, answer = example.messages
        system = next((m.content for m in prompt if m.role == "system"), None)
        return cls(system, tuple(m for m in prompt if m.role != "system"), answer.content)

    @property
    def query(self) -> str:
        """The user turns: what retrieval compares."""
        return "\n".join(m.content for m in self.turns if m.role == "user")


def _messages(system: str | None, *turns: Sequence[Message]) -> list[dict[str, str]]:
    head = [{"role": "system", "content": system}] if system else []
    return head + [m.to_dict() for part in turns for m in part]


@dataclass
class SystemScores:
    """One system's per-example scores, its answers by job index, and how many requests failed."""

    scores: list[float] = field(default_factory=list)
    answers: dict[int, str] = field(default_factory=dict)
    errors: int = 0
    first_error: str = ""

    @property
    def points(self) -> float:
        """Mean score in points (0-100); a failed request scores 0."""
        total = len(self.scores) + self.errors
        return round(100 * sum(self.scores) / total, 2) if total else 0.0


class Evaluator:
    """Runs the four systems and the probe against one gateway with bounded concurrency."""

    def __init__(
        self,
        client: openai.AsyncOpenAI,
        *,
        base_model: str = "base",
        concurrency: int = 8,
        max_tokens: int = 128,
        console: Console | None = None,
    ) -> None:
        self.client = client
        self.base_model = base_model
        self.max_tokens = max_tokens
        self.console = console or Console(stderr=True)
        self._slots = asyncio.Semaphore(concurrency)

    async def answer(self, model: str, messages: list[dict[str, str]], max_tokens: int) -> str:
        """One greedy chat completion's text."""
        async with self._slots:
            response = await self.client.chat.completions.create(
                model=model,
                messages=messages,  # type: ignore[arg-type]
                temperature=0.0,
                max_tokens=max_tokens,
            )
        return response.choices[0].message.content or ""

    async def score(
        self,
        jobs: Sequence[tuple[str, list[dict[str, str]], Callable[[str], float]]],
        progress: Progress,
        label: str,
        max_tokens: int | None = None,
        one_at_a_time: bool = False,
    ) -> SystemScores:
        """Ask each (model, messages, scorer) and collect the scores; errors are counted, not raised.

        ``one_at_a_time``: in order, each request alone in vLLM's batch. Greedy answers in bf16 depend on what
        else is in the batch; alone, the same model gives the same answers every run.
        """
        task = progress.add_task(label, total=len(jobs))
        result = SystemScores()
        # The bar only draws on a terminal; a log file or a pipe gets a line each tenth of the way instead.
        lines = None if progress.console.is_terminal else _ProgressLines(progress.console, label, len(jobs))

        async def one(i: int, model: str, messages: list[dict[str, str]], scorer: Callable[[str], float]) -> None:
            try:
                result.answers[i] = await self.answer(model, messages, max_tokens or self.max_tokens)
                result.scores.append(scorer(result.answers[i]))
            except openai.APIError as exc:
                result.errors += 1
                result.first_error = result.first_error or str(exc)
            finally:
                progress.advance(task)
                if lines is not None:
                    lines.advance()

        if one_at_a_time:
            for i, job in enumerate(jobs):
                await one(i, *job)
        else:
            await asyncio.gather(*(one(i, *job) for i, job in enumerate(jobs)))
        if result.errors:
            self.console.print(f"[yellow]{label}: {result.errors} requests failed, e.g. {result.first_error}[/]")
        if lines is not None:
            progress.console.print(f"{label}: {len(jobs)} asked, {result.points:.1f} points", highlight=False)
        return result


class _ProgressLines:
    """Plain progress lines for a console that is not a terminal: answers so far, rate and ETA, ten per system."""

    def __init__(self, console: Console, label: str, total: int) -> None:
        self.console = console
        self.label = label
        self.total = total
        self.every = max(1, math.ceil(total / 10))
        self.done = 0
        self.started = time.monotonic()

    def advance(self) -> None:
        self.done += 1
        if self.done % self.every and self.done != self.total:
            return
        elapsed = time.monotonic() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = f"{(self.total - self.done) / rate:.0f} s" if rate > 0 else "-"
        self.console.print(
            f"{self.label}: {self.done}/{self.total} answered, {rate:.1f}/s, ETA {eta}", highlight=False, soft_wrap=True
        )


def _few_shot(train: Sequence[ChatExample], k: int, seed: int) -> list[Case]:
    return [Case.from_example(e) for e in random.Random(seed).sample(list(train), min(k, len(train)))]


def _shot_turns(shots: Sequence[Case]) -> list[Message]:
    return [m for shot in shots for m in (*shot.turns, Message("assistant", shot.reference))]


def _retrieve(cases: Sequence[Case], train: Sequence[Case], k: int) -> list[list[Case]]:
    from core import embedding_export
    from core.embeddings import Embedder, nearest

    # The gateway's embedder; eval runs where torch is, so a missing export is made here rather than refused.
    embedder = Embedder(embedding_export.prepare())
    top = nearest(embedder.encode([c.query for c in cases]), embedder.encode([t.query for t in train]), k)
    # Most similar last: closest to the question it illustrates.
    return [[train[i] for i in reversed(row)] for row in top.tolist()]


async def _evaluate(
    evaluator: Evaluator,
    model: str,
    cases: Sequence[Case],
    train: Sequence[ChatExample],
    spec: TaskSpec,
    k: int,
    seed: int,
    probe: int,
) -> dict[str, Any]:
    metric = METRICS[spec.metric]
    base = evaluator.base_model
    shots = _shot_turns(_few_shot(train, k, seed))
    train_cases = [Case.from_example(e) for e in train]
    evaluator.console.print(f"retrieving {k} training examples per test example ({len(train_cases)} indexed)")
    retrieved = await asyncio.to_thread(_retrieve, cases, train_cases, k)

    def system_of(case: Case) -> str | None:
        return case.system or spec.system_prompt

    def scorer(case: Case) -> Callable[[str], float]:
        return lambda answer: metric(answer, case.reference)

    requests: dict[str, list[tuple[str, list[dict[str, str]], Callable[[str], float]]]] = {
        "adapter": [(model, _messages(c.system, c.turns), scorer(c)) for c in cases],
        "base_prompt": [(base, _messages(system_of(c), c.turns), scorer(c)) for c in cases],
        "few_shot": [(base, _messages(system_of(c), shots, c.turns), scorer(c)) for c in cases],
        "rag": [
            (base, _messages(system_of(c), _shot_turns(near), c.turns), scorer(c))
            for c, near in zip(cases, retrieved, strict=True)
        ],
    }
    results: dict[str, SystemScores] = {}
    with _progress(evaluator.console) as progress:
        for name, jobs in requests.items():
            results[name] = await evaluator.score(jobs, progress, SYSTEM_TITLES[name])
        probes: dict[str, SystemScores] = {}
        if probe:
            for label, target in (("base", base), ("adapter", model)):
                jobs = [
                    (target, _messages(None, [Message("user", q)]), _probe_scorer(accepted))
                    for q, accepted in QUESTIONS[:probe]
                ]
                # One at a time: a few answers flip with the batch they share, and the probe's
                # base-to-adapter difference is a few answers.
                probes[label] = await evaluator.score(
                    jobs, progress, f"general probe: {label}", max_tokens=PROBE_MAX_TOKENS, one_at_a_time=True
                )
    for name, result in (*results.items(), *probes.items()):
        failed = result.errors / max(1, result.errors + len(result.scores))
        if failed > MAX_FAILED_SHARE:
            # A report from a gateway that was down or overloaded would gate promotion on noise.
            raise UpstreamError(
                f"{result.errors} of {result.errors + len(result.scores)} requests for {name} failed "
                f"(e.g. {result.first_error}); no report was made",
                code="eval_failed",
            )
    scores = {name: results[name].points for name in SYSTEMS}
    best = max(BASELINES, key=lambda name: scores[name])
    report: dict[str, Any] = {
        "report_version": REPORT_VERSION,
        "model": model,
        "metric": spec.metric,
        "examples": len(cases),
        "k": k,
        "seed": seed,
        "scores": scores,
        "errors": {name: results[name].errors for name in SYSTEMS},
        "best_baseline": best,
        "margin": round(scores["adapter"] - scores[best], 2),
        "created_at": datetime.now(UTC).isoformat(),
    }
    if probes:
        report["probe"] = {
            "questions": len(QUESTIONS[:probe]),
            "base": probes["base"].points,
            "adapter": probes["adapter"].points,
            "delta": round(probes["adapter"].points - probes["base"].points, 2),
            # What forgetting looks like: each question's answers, to read where the two differ.
            "answers": [
                {"question": q, "base": probes["base"].answers.get(i), "adapter": probes["adapter"].answers.get(i)}
                for i, (q, _) in enumerate(QUESTIONS[:probe])
            ],
        }
    return report


def _probe_scorer(accepted: tuple[str, ...]) -> Callable[[str], float]:
    return lambda answer: score_probe_answer(answer, accepted)


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def evaluate(
    model: str,
    test: Path,
    train: Path,
    *,
    base_url: str,
    spec: TaskSpec | None = None,
    k: int = DEFAULT_K,
    seed: int = 0,
    probe: bool | int = True,
    concurrency: int = 8,
    max_tokens: int = 128,
    timeout_s: float = 300.0,
    api_key: str = "quiver",
    console: Console | None = None,
) -> dict[str, Any]:
    """Score ``model`` (``name@vN``) and the three baselines on ``test`` through the gateway at ``base_url``.

    ``train`` supplies the few-shot and retrieved examples. ``probe``: the general probe's first N questions
    (True: all, False: none). Returns the report (see the module docstring).
    """
    if k < 1:
        raise InvalidRequest("k (examples shown to the few-shot and RAG baselines) must be at least 1", param="k")
    spec = spec or TaskSpec()
    test_file, train_file = load_examples(test), load_examples(train)
    cases = [Case.from_example(e) for e in test_file.chat_examples()]
    train_examples = train_file.chat_examples()
    if not cases:
        raise DataError(f"{test}: no test examples")
    if spec.system_prompt is None and not all(c.system for c in cases):
        raise DataError(
            "the base + system prompt baseline needs a system prompt: give the dataset spec one "
            "(system_prompt) or put a system message in every test example",
        )

    async def run() -> dict[str, Any]:
        client = openai.AsyncOpenAI(base_url=base_url.rstrip("/") + "/v1", api_key=api_key, timeout=timeout_s)
        async with client:
            evaluator = Evaluator(client, concurrency=concurrency, max_tokens=max_tokens, console=console)
            questions = len(QUESTIONS) if probe is True else int(probe)
            return await _evaluate(evaluator, model, cases, train_examples, spec, k, seed, questions)

    report = asyncio.run(run())
    report["test"] = {"file": str(test), **test_file.fingerprint()}
    report["train"] = {"file": str(train), **train_file.fingerprint()}
    return report


def report_table(report: Mapping[str, Any], margin: float = DEFAULT_MARGIN) -> Table:
    """The report as the terminal shows it: one row per system, the verdict in the caption."""
    scores: Mapping[str, float] = report["scores"]
    table = Table("system", f"{report['metric']} (points)", "vs adapter", title=f"Eval of {report['model']}")
    for name in SYSTEMS:
        delta = "" if name == "adapter" else f"{scores['adapter'] - scores[name]:+.1f}"
        best = " (best baseline)" if name == report["best_baseline"] else ""
        table.add_row(SYSTEM_TITLES[name] + best, f"{scores[name]:.1f}", delta)
    probe = report.get("probe")
    if probe:
        table.add_row("general probe: base", f"{probe['base']:.1f}", "")
        table.add_row("general probe: adapter", f"{probe['adapter']:.1f}", f"{probe['delta']:+.1f}")
    verdict = "passes" if report["margin"] >= margin else "does not pass"
    table.caption = (
        f"{report['examples']} test examples; adapter {report['margin']:+.1f} points over the best baseline: "
        f"{verdict} the {margin:g}-point promotion margin"
    )
    return table
