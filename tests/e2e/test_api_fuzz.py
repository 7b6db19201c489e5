"""schemathesis over the gateway's own OpenAPI spec: over a thousand generated requests, no 5xx, none left hanging.

The gateway runs for real over HTTP in front of an instant OpenAI-shaped upstream (it speaks vLLM's LoRA
API too), so generation requests that pass validation reach an upstream and come back in microseconds.
"""

from __future__ import annotations

import re
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

from gateway import Settings
from loadtest.instant_upstream import start
from tests.servers import running_gateway

CASES_AT_LEAST = 1000


def test_generated_requests_never_get_a_server_error_or_hang(tmp_path: Path) -> None:
    with ExitStack() as stack:
        upstream = start(stack, tmp_path)
        settings = Settings(vllm_url=upstream, data_dir=tmp_path / "data", base_model="instant", fine_tuning_workers=0)
        with running_gateway(settings) as gateway:
            st = Path(sys.executable).with_name("st")
            run = subprocess.run(
                [str(st), "run", f"{gateway.url}/openapi.json", "--checks", "not_a_server_error",
                 "--max-examples", "40", "--request-timeout", "20", "--seed", "1", "--no-color"],
                capture_output=True, text=True, timeout=600, cwd=tmp_path,  # it leaves a .schemathesis/ there
            )  # fmt: skip
    report = run.stdout + run.stderr
    assert run.returncode == 0, report[-6000:]
    counted = re.search(r"(\d+) generated, (\d+) passed", report)
    assert counted is not None, report[-3000:]
    generated, passed = map(int, counted.groups())
    print(f"schemathesis: {generated} cases generated, {passed} passed")
    assert generated >= CASES_AT_LEAST and passed == generated
