"""The parts of `quiver loadtest` that need no server: durations, the stats summary, Zipf, what a target offers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from core.errors import InvalidRequest
from loadtest import runner
from loadtest.scenarios import SCENARIOS, Offer, Options, zipf_weights
from quiver.cli import app

# What GET /v1/models of a gateway with adapter `support` (v1, v2, alias prod) lists.
MODELS = {
    "data": [
        {"id": "SmolLM2-135M-Instruct", "parent": None},
        {"id": "base", "parent": None},
        {"id": "support", "parent": "SmolLM2-135M-Instruct"},
        {"id": "support@v1", "parent": "SmolLM2-135M-Instruct"},
        {"id": "support@v2", "parent": "SmolLM2-135M-Instruct"},
        {"id": "support@prod", "parent": "SmolLM2-135M-Instruct"},
    ]
}
STATS_CSV = """\
Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,Min Response Time,\
Max Response Time,Average Content Size,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,99.9%,99.99%,100%
POST,support,40,2,310,330.5,120.1,900.2,512.0,3.9,0.2,310,330,350,360,400,700,880,900,900,900,900
METRIC,ttft,0,0,0,0.0,0,0,0.0,0.0,0.0,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A
,Aggregated,40,2,310,330.5,120.1,900.2,512.0,3.9,0.2,310,330,350,360,400,700,880,900,900,900,900
"""


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("45s", 45), ("10m", 600), ("1h30m", 5400), ("2m5s", 125)])
def test_durations_parse_like_locust_run_time(text: str, seconds: int) -> None:
    assert runner.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "ten", "5x", "1.5m", "m", "0s", "-3"])
def test_durations_that_do_not_parse_are_invalid_requests(text: str) -> None:
    with pytest.raises(InvalidRequest):
        runner.parse_duration(text)


def test_summary_reads_locusts_stats_csv(tmp_path: Path) -> None:
    path = tmp_path / "locust_stats.csv"
    path.write_text(STATS_CSV)
    rows = runner.read_stats(path)
    assert [(r.kind, r.name, r.requests, r.failures) for r in rows] == [
        ("POST", "support", 40, 2),
        ("METRIC", "ttft", 0, 0),
        ("", "Aggregated", 40, 2),
    ]
    assert (rows[0].p50, rows[0].p95, rows[0].p99, rows[0].rps) == (310, 700, 900, 3.9)
    assert rows[1].p50 is None  # N/A: no sample yet
    console = Console(width=200, record=True)
    console.print(runner.stats_table(rows, "support"))
    assert "│ POST   │ support    │ 40       │ 2        │ 310    │ 700    │ 900    │ 3.90" in console.export_text()


def test_failures_show_the_failure_text_without_locusts_wrapper(tmp_path: Path) -> None:
    path = tmp_path / "locust_failures.csv"
    path.write_text(
        "Method,Name,Error,Occurrences,First Seen,Last Seen\n"
        'POST,rag:x,"CatchResponseError(""404: model \'rag:x\' does not exist"")",3,,\n'
        "POST,base,ConnectionRefusedError(111),5,,\n"
    )
    assert runner.read_failures(path) == [
        ("base", "ConnectionRefusedError(111)", 5),
        ("rag:x", "404: model 'rag:x' does not exist", 3),
    ]


def test_zipf_weights_fall_with_rank() -> None:
    weights = zipf_weights(4)
    assert weights[0] == 1 and weights == sorted(weights, reverse=True)
    assert weights[1] == pytest.approx(2**-1.1)


def test_offer_sorts_models_into_kinds() -> None:
    gateway = Offer.parse(MODELS, {"data": [{"routing": {"description": "support tickets"}}]}, rag=["handbook"])
    assert gateway.base == "SmolLM2-135M-Instruct"
    assert gateway.adapters == ("support",) and gateway.versions == ("support@v1", "support@v2")
    assert gateway.numbers("support") == [1, 2]
    assert gateway.rag == ("rag:handbook",) and gateway.described
    assert gateway.mix() == ["support", "auto", "rag:handbook"]
    assert all(gateway.missing(s) is None for s in SCENARIOS)

    vllm = Offer.parse({"data": MODELS["data"][:1]}, None)  # vLLM direct: no adapters, no registry API
    assert vllm.missing("base") is None and vllm.streamed == "SmolLM2-135M-Instruct"
    assert "needs an adapter" in str(vllm.missing("adapter"))
    assert "registry API" in str(Offer.parse(MODELS, None).missing("hotswap"))
    notes = Offer.parse(MODELS, {"data": []}).notes("mixed", Options())
    assert any("no rag:COLLECTION" in n for n in notes)


def test_listed_rag_collections_are_used_unless_named_ones_replace_them() -> None:
    base = MODELS["data"][0]["id"]
    listed = {"data": [*MODELS["data"], {"id": "rag:handbook", "parent": base}, {"id": "rag:faq", "parent": base}]}
    offer = Offer.parse(listed, {"data": []})
    assert offer.rag == ("rag:handbook", "rag:faq") and "rag:handbook" not in offer.adapters
    assert Offer.parse(listed, {"data": []}, rag=["faq"]).rag == ("rag:faq",)


def test_options_travel_through_the_environment() -> None:
    options = Options(max_tokens=8, push_dir=Path("/adapters/support"), rag=("a", "b"))
    assert Options.from_env(options.to_env()) == options
    assert Options.from_env({}) == Options()


def test_every_scenario_names_user_classes_the_locustfile_defines() -> None:
    # Parsed, not imported: importing locust would monkey-patch this process with gevent.
    tree = ast.parse(runner.LOCUSTFILE.read_text())
    defined = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    assert {cls for classes in SCENARIOS.values() for cls in classes} <= defined


def test_metrics_give_rss_and_request_counts() -> None:
    text = (
        "process_resident_memory_bytes 1.5e+08\n"
        "# TYPE quiver_requests_total counter\n"
        'quiver_requests_total{endpoint="chat",model="a",adapter="a@v1",status="200"} 7.0\n'
        'quiver_requests_total{endpoint="chat",model="b",adapter="b",status="404"} 2.0\n'
        'quiver_requests_created{endpoint="chat",model="b",adapter="b",status="404"} 1.7e+09\n'
    )
    assert runner.read_metrics(text) == (1.5e8, 9.0, 2.0)
    assert runner.read_metrics("") == (None, None, None)


def test_growth_is_measured_from_the_first_to_the_last_sample() -> None:
    samples = [
        runner.Sample(0, 100e6, 0, 0),
        runner.Sample(5, 130e6, 50, 1),
        runner.Sample(10, 110e6, 90, 1),
    ]
    growth = runner.Growth.of(samples)
    assert growth is not None
    assert (growth.rss_max, growth.requests, growth.failures) == (130e6, 90, 1)
    assert growth.percent == pytest.approx(10.0)
    assert runner.Growth.of([runner.Sample(0, None, None, None)]) is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--scenario", "nope"], "unknown scenario 'nope'; choose one of: base, adapter"),
        (["--duration", "ten"], "duration 'ten' does not parse"),
        (["--host", "127.0.0.1:9"], "is not a URL"),
        ([], "cannot reach http://127.0.0.1:9"),
    ],
)
def test_bad_options_are_one_line_errors(options: list[str], message: str, tmp_path: Path) -> None:
    args = ["loadtest", "--host", "http://127.0.0.1:9", "--out", str(tmp_path / "out"), *options]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 1
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert isinstance(result.exception, SystemExit)  # typer.Exit, not a traceback
    assert not (tmp_path / "out").exists()
