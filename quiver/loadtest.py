"""``quiver loadtest``: run a locust scenario against a gateway (``loadtest/runner.py``) and write its results."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from core.errors import QuiverError
from quiver.context import console, err, fail, needs, served_settings


def loadtest(
    scenario: Annotated[
        str, typer.Option(help="base, adapter, churn, streaming, hotswap or mixed (see the README).")
    ] = "base",
    users: Annotated[int, typer.Option(min=1, help="Concurrent users.")] = 4,
    spawn_rate: Annotated[float, typer.Option(min=0.01, help="Users started per second.")] = 2.0,
    duration: Annotated[str, typer.Option(help="How long to run: 90, 45s, 10m, 1h30m.")] = "60s",
    host: Annotated[str | None, typer.Option(help="Target URL (default: the gateway `quiver up` serves).")] = None,
    web: Annotated[bool, typer.Option(help="Run locust's web UI instead of a headless run.")] = False,
    out: Annotated[
        Path | None, typer.Option(help="Results directory (default: loadtest/results/SCENARIO-TIMESTAMP).")
    ] = None,
    push_dir: Annotated[
        Path | None,
        typer.Option(exists=True, file_okay=False, help="hotswap: an adapter directory to push new versions of."),
    ] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="max_tokens of every request.")] = 16,
    rag: Annotated[
        list[str] | None,
        typer.Option(help="mixed: use this RAG collection (repeatable; default: every rag:C the target lists)."),
    ] = None,
    sample_every: Annotated[
        float, typer.Option(min=0.5, help="Seconds between samples of the target's /metrics (RSS, counters).")
    ] = 5.0,
) -> None:
    """Load-test a gateway with a locust scenario; write CSV, HTML and RSS samples; exit 1 if any request failed.

    Also the soak test: `quiver loadtest --scenario churn --duration 10m` reports the gateway's memory growth.
    """
    from datetime import datetime

    needs("quiver loadtest", "bench")
    from loadtest import runner
    from loadtest.scenarios import Options

    if host is None:
        settings = served_settings()
        host = f"http://{settings.host}:{settings.port}"
    stamp = f"{datetime.now():%Y%m%d-%H%M%S}"
    try:
        test = runner.LoadTest(
            scenario=scenario, host=host.rstrip("/"), users=users, spawn_rate=spawn_rate,
            duration_s=runner.parse_duration(duration),
            out=out or Path("loadtest/results") / f"{scenario}-{stamp}", web=web,
            options=Options(max_tokens, push_dir.resolve() if push_dir else None, tuple(rag or ())),
            sample_every_s=sample_every,
        )  # fmt: skip
        code = runner.run(test, console, err)
    except QuiverError as exc:
        fail(exc)
    raise typer.Exit(code)
