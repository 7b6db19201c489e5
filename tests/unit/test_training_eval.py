"""The eval gate's pieces: metrics, the prompts each system gets, retrieval, the report and its table."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from core.embeddings import nearest
from core.errors import UpstreamError
from tests.factories import output_of, quiet
from training.demo import SYSTEM_PROMPT, write_demo
from training.eval import (
    Case,
    Evaluator,
    TaskSpec,
    _evaluate,
    _progress,
    report_table,
    score_exact_match,
    score_rouge_l,
)
from training.probe import QUESTIONS, score_probe_answer
from trainingdata.formats import ChatExample, DataError, Message


def chat(*turns: tuple[str, str]) -> ChatExample:
    return ChatExample(messages=tuple(Message(role, text) for role, text in turns), source="t", line=1)  # type: ignore[arg-type]


def test_exact_match_ignores_case_and_spacing() -> None:
    assert score_exact_match("  Paris \n", "paris") == 1.0
    assert score_exact_match("Paris, France", "Paris") == 0.0


def test_rouge_l_is_the_f1_of_the_longest_common_subsequence() -> None:
    assert score_rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    # LCS "a c d": precision 3/4, recall 3/3.
    assert score_rouge_l("a b c d", "a c d") == pytest.approx(2 * 0.75 / 1.75)
    assert score_rouge_l("x y", "a b") == 0.0 and score_rouge_l("", "a") == 0.0


def test_probe_answers_count_whole_words_only() -> None:
    assert score_probe_answer("The capital of France is Paris.", ("Paris",)) == 1.0
    assert score_probe_answer("A Parisian café.", ("Paris",)) == 0.0
    assert score_probe_answer("It has 8 legs.", ("8", "eight")) == 1.0
    assert len({q for q, _ in QUESTIONS}) == len(QUESTIONS) >= 50


def test_task_spec_reads_the_demo_spec_and_refuses_unknown_metrics(tmp_path: Path) -> None:
    demo = write_demo(tmp_path / "demo", n_train=20, n_val=4, n_test=4)
    spec = TaskSpec.from_file(demo.spec)
    assert spec == TaskSpec(metric="json_field_accuracy", system_prompt=SYSTEM_PROMPT)
    with pytest.raises(DataError, match="unknown metric 'bleu'"):
        TaskSpec(metric="bleu")
    bad = tmp_path / "spec.json"
    bad.write_text("[1]")
    with pytest.raises(DataError, match="must be a JSON object"):
        TaskSpec.from_file(bad)


def test_a_case_separates_system_prompt_turns_and_reference() -> None:
    case = Case.from_example(chat(("system", "Be terse."), ("user", "Hi"), ("assistant", "Hello")))
    assert case == Case("Be terse.", (Message("user", "Hi"),), "Hello") and case.query == "Hi"


def test_nearest_ranks_by_cosine_similarity() -> None:
    corpus = np.eye(4, dtype=np.float32)
    queries = np.array([[0.1, 0.9, 0.3, 0.0], [1.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    assert nearest(queries, corpus, 2).tolist() == [[1, 2], [0, 1]]
    assert nearest(queries, corpus, 9).shape == (2, 4)


def test_each_system_gets_its_prompt_and_failures_score_zero(tmp_path: Path) -> None:
    train = [
        chat(("user", "my Lumo Lamp was charged twice"), ("assistant", '{"category": "billing"}')),
        chat(("user", "the Orbit speaker will not pair"), ("assistant", '{"category": "technical"}')),
        chat(("user", "where is my kettle delivery"), ("assistant", '{"category": "shipping"}')),
    ]
    test = [Case(None, (Message("user", "my Lumo Lamp was charged twice!"),), '{"category": "billing"}')]
    seen: dict[str, list[list[dict[str, str]]]] = {}

    def answer(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.setdefault(body["model"], []).append(body["messages"])
        if body["model"] == "base" and body["messages"] == [{"role": "user", "content": "What is 2 plus 2?"}]:
            return httpx.Response(500, json={"error": {"message": "boom", "type": "server_error"}})
        content = '{"category": "billing"}' if body["model"] == "bot@v1" else "The answer is four (Paris)."
        return httpx.Response(200, json=completion(content))

    async def run() -> dict[str, Any]:
        client = openai.AsyncOpenAI(
            base_url="http://gateway/v1", api_key="k", max_retries=0,
            http_client=httpx.AsyncClient(transport=httpx.MockTransport(answer)),
        )  # fmt: skip
        evaluator = Evaluator(client, console=quiet())
        spec = TaskSpec("json_field_accuracy", "Triage.")
        return await _evaluate(evaluator, "bot@v1", test, train, spec, 2, 0, len(QUESTIONS))

    report = asyncio.run(run())
    adapter, *_ = seen["bot@v1"]
    assert adapter == [{"role": "user", "content": "my Lumo Lamp was charged twice!"}]
    base_prompt, few_shot, rag = seen["base"][:3]
    assert base_prompt == [{"role": "system", "content": "Triage."}, adapter[0]]
    assert few_shot[0]["content"] == "Triage." and len(few_shot) == 1 + 2 * 2 + 1
    # RAG shows the most similar training example last, right before the question.
    assert rag[-3:] == [
        {"role": "user", "content": "my Lumo Lamp was charged twice"},
        {"role": "assistant", "content": '{"category": "billing"}'},
        adapter[0],
    ]
    assert report["scores"] == {"adapter": 100.0, "base_prompt": 0.0, "few_shot": 0.0, "rag": 0.0}
    assert report["best_baseline"] == "base_prompt" and report["margin"] == 100.0
    # "four (Paris)" answers two probe questions; one of them failed on the base, and counts as wrong.
    assert report["probe"]["adapter"] == 0.0
    assert report["probe"]["base"] == round(100 / len(QUESTIONS), 2)
    # Each question's answers are kept, in question order; the failed request has none.
    answers = report["probe"]["answers"]
    assert [a["question"] for a in answers] == [q for q, _ in QUESTIONS]
    assert answers[0] == {
        "question": QUESTIONS[0][0], "base": "The answer is four (Paris).", "adapter": '{"category": "billing"}'
    }  # fmt: skip
    assert next(a for a in answers if a["question"] == "What is 2 plus 2?")["base"] is None
    assert report["errors"] == {"adapter": 0, "base_prompt": 0, "few_shot": 0, "rag": 0}


def completion(content: str) -> dict[str, Any]:
    return {
        "id": "c",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
    }


def test_the_table_shows_every_system_and_the_verdict() -> None:
    report = {
        "model": "bot@v2",
        "metric": "exact_match",
        "examples": 10,
        "scores": {"adapter": 80.0, "base_prompt": 10.0, "few_shot": 40.0, "rag": 77.0},
        "best_baseline": "rag",
        "margin": 3.0,
        "probe": {"base": 70.0, "adapter": 68.0, "delta": -2.0},
    }
    console = quiet()
    console.print(report_table(report, margin=5.0))
    shown = output_of(console)
    assert "base + RAG (best baseline)" in shown and "+3.0" in shown and "-2.0" in shown
    assert "does not pass the 5-point promotion margin" in " ".join(shown.split())


def test_an_eval_whose_requests_fail_makes_no_report() -> None:
    def unreachable(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    async def run() -> dict[str, Any]:
        client = openai.AsyncOpenAI(
            base_url="http://gateway/v1", api_key="k", max_retries=0,
            http_client=httpx.AsyncClient(transport=httpx.MockTransport(unreachable)),
        )  # fmt: skip
        train = [chat(("user", "a"), ("assistant", "b")), chat(("user", "c"), ("assistant", "d"))]
        test = [Case(None, (Message("user", "a?"),), "b")]
        return await _evaluate(Evaluator(client, console=quiet()), "bot@v1", test, train, TaskSpec(), 1, 0, 0)

    with pytest.raises(UpstreamError, match=r"1 of 1 requests for adapter failed \(e.g. Connection error.\)") as caught:
        asyncio.run(run())
    assert caught.value.code == "eval_failed"


def test_without_a_terminal_each_system_reports_progress_lines() -> None:
    console = quiet()

    async def run() -> None:
        transport = httpx.MockTransport(lambda _: httpx.Response(200, json=completion("4")))
        client = openai.AsyncOpenAI(
            base_url="http://gateway/v1", api_key="k", max_retries=0, http_client=httpx.AsyncClient(transport=transport)
        )
        evaluator = Evaluator(client, console=console)
        jobs = [("base", [{"role": "user", "content": f"q{i}"}], lambda answer: 1.0) for i in range(25)]
        with _progress(console) as progress:
            await evaluator.score(jobs, progress, "base + prompt")

    asyncio.run(run())
    lines = [line for line in output_of(console).splitlines() if line.startswith("base + prompt: ")]
    # A line each tenth of the way (every 3 of 25) and the last, then the score.
    answered = [line.split()[3] for line in lines[:-1]]
    assert answered == [f"{n}/25" for n in (3, 6, 9, 12, 15, 18, 21, 24, 25)]
    assert all("/s, ETA " in line for line in lines[:-1])
    assert lines[-1] == "base + prompt: 25 asked, 100.0 points"
