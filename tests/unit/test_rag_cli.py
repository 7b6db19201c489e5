"""`quiver rag` as a user runs it: ingest markdown, list, query, re-ingest, remove."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from quiver.cli import app

# The CLI embeds with the export `quiver model prepare` makes.
pytestmark = pytest.mark.usefixtures("embeddings_dir")


def run(args: list[str], data_dir: Path) -> tuple[int, str]:
    # No QUIVER_RAG_URL: the embedded index in the data dir, as a fresh install has it.
    result = CliRunner().invoke(app, ["rag", *args], env={"QUIVER_DATA_DIR": str(data_dir), "QUIVER_RAG_URL": None})
    return result.exit_code, result.output


def test_ingest_two_markdown_files_and_query_them(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (tmp_path / "deploy.md").write_text(
        "# Deploying\n\n## Kubernetes\n\nApply the Helm chart with helm install quiver ./chart and wait for the pods.\n"
    )
    (tmp_path / "billing.md").write_text(
        "# Billing\n\nInvoices are sent on the first day of each month; refunds take five business days.\n"
    )
    files = [str(tmp_path / "deploy.md"), str(tmp_path / "billing.md")]

    code, output = run(["ingest", "handbook", *files], data)
    assert code == 0, output
    assert "deploy.md: 1 chunks" in output and "billing.md: 1 chunks" in output
    assert "'handbook': 2 chunks written from 2 files" in output

    code, output = run(["list"], data)
    assert code == 0, output
    assert re.search(r"handbook\s+│ 2\s+│ 2\s+│ all-MiniLM-L6-v2", output), output

    code, output = run(["query", "handbook", "when will I get my refund?", "-k", "2"], data)
    assert code == 0, output
    ranked = re.findall(r"^\[(\d)\] (0\.\d{3})  (\S+) \((.*)\)$", output, re.MULTILINE)
    assert [(n, name, where) for n, _, name, where in ranked] == [
        ("1", "billing.md", "Billing, line 3"),
        ("2", "deploy.md", "Deploying > Kubernetes, line 5"),
    ]
    assert float(ranked[0][1]) > float(ranked[1][1])
    assert "refunds take five business days" in output

    code, output = run(["query", "handbook", "how do I deploy on kubernetes?", "-k", "1"], data)
    assert code == 0, output
    assert "[1]" in output and "deploy.md (Deploying > Kubernetes, line 5)" in output and "billing.md" not in output

    # The same files again change nothing.
    code, output = run(["ingest", "handbook", *files], data)
    assert code == 0, output
    assert "deploy.md: unchanged" in output and "'handbook': 0 chunks written" in output

    code, output = run(["rm", "handbook"], data)
    assert code == 0, output
    code, output = run(["query", "handbook", "refund"], data)
    assert code == 1
    assert "RAG collection 'handbook' does not exist" in output


def test_a_malformed_jsonl_line_fails_the_ingest_naming_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "faq.jsonl").write_text('{"text": "Fine.", "url": "https://x"}\n{"text": "broken"\n')

    code, output = run(["ingest", "faq", str(tmp_path / "faq.jsonl")], tmp_path / "data")
    assert code == 1
    assert "faq.jsonl:2: not valid JSON" in " ".join(output.split())
