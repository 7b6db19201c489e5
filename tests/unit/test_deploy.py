"""deploy/: the Helm chart renders and every manifest validates against the Kubernetes schemas; compose, chart,
Prometheus and the Grafana dashboard agree with the settings and metrics the code has. (No container engine
runs here, so the images themselves are not built.)"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from helm_python.chart import Chart, lint

from core import embedded
from gateway.metrics import Metrics
from gateway.settings import Settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
CHART = DEPLOY / "helm" / "quiver"
KUBERNETES = "1.32.0"
# Read by the CLI rather than the gateway's Settings.
CLI_VARIABLES = {"QUIVER_CACHE_DIR", "QUIVER_MODEL", "QUIVER_VLLM_PORT"}

MINIMAL = {"database": {"url": "postgresql+psycopg2://quiver:pw@postgres:5432/quiver"}}
EVERYTHING = {
    "database": {"url": "postgresql+psycopg2://quiver:pw@postgres:5432/quiver"},
    "redis": {"url": "redis://redis:6379/0"},
    "adminKey": {"value": "a-bootstrap-admin-key"},
    "vllm": {"replicas": 3, "gpu": {"enabled": True, "count": 2}, "extraArgs": ["--enable-prefix-caching"]},
    "gateway": {"routingFile": '[auto]\ndefault = "base"\n', "otelEndpoint": "http://otel-collector:4318"},
    "adapters": {"storageClass": "nfs-client"},
    "merged": [{"name": "support-v3", "model": "/adapters/merged/support@v3", "servedName": "support@v3"}],
    "training": {"enabled": True, "args": ["/adapters/data/support.jsonl", "--name", "support"]},
}


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    with Chart.load(CHART) as chart:
        rendered = chart.render(values, name="quiver", namespace="ml")
    return [doc for text in rendered.values() for doc in yaml.safe_load_all(text) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def settings_variables() -> set[str]:
    return {f"QUIVER_{name.upper()}" for name in Settings.model_fields} | CLI_VARIABLES


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


@pytest.mark.parametrize("values", [MINIMAL, EVERYTHING], ids=["minimal", "everything"])
def test_every_rendered_manifest_is_valid_kubernetes(values: dict[str, Any]) -> None:
    docs = render(values)
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    report = lint(str(CHART), values, strict=True, kube_version=f"v{KUBERNETES}")
    assert report["errors"] == [] and all(m["severity"] < 3 for m in report["messages"]), report


def test_the_gateway_runs_the_gateway_image_and_the_rest_the_full_one() -> None:
    docs = render(EVERYTHING)
    images = {
        d["metadata"]["name"]: [c["image"] for c in d["spec"]["template"]["spec"]["containers"]]
        for d in docs
        if d["kind"] in {"Deployment", "StatefulSet", "Job"}
    }
    assert images.pop("quiver-gateway") == ["quiver:gateway"]
    assert images and all(found == ["quiver:cuda"] for found in images.values()), images
    gateway = next(d for d in by_kind(docs, "Deployment") if d["metadata"]["name"] == "quiver-gateway")
    [container] = gateway["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["quiver", "up"]
    # No worker beside it: new fine-tuning jobs are refused (501), not queued for workers the chart does not run.
    assert "QUIVER_FINE_TUNING_WORKERS" not in env_of(container)
    changed = render({**MINIMAL, "gateway": {"image": {"repository": "registry.example/quiver", "tag": "gw-1"}}})
    gateway = next(d for d in by_kind(changed, "Deployment") if d["metadata"]["name"] == "quiver-gateway")
    assert gateway["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example/quiver:gw-1"


def test_the_chart_has_every_part_a_cluster_needs() -> None:
    docs = render(EVERYTHING)
    [vllm] = by_kind(docs, "StatefulSet")
    [pvc] = by_kind(docs, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    container = vllm["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert "--enable-lora" in container["args"] and "--max-lora-rank=16" in container["args"]
    assert [h["kind"] for h in by_kind(docs, "HorizontalPodAutoscaler")] == ["HorizontalPodAutoscaler"]
    assert {d["metadata"]["name"] for d in by_kind(docs, "Deployment")} == {
        "quiver-gateway",
        "quiver-merged-support-v3",
    }
    assert len(by_kind(docs, "Job")) == 1 and len(by_kind(docs, "Secret")) == 1
    merged = next(d for d in by_kind(docs, "Deployment") if d["metadata"]["name"] == "quiver-merged-support-v3")
    assert "--enable-lora" not in merged["spec"]["template"]["spec"]["containers"][0]["args"]


def test_chart_settings_paths_and_ports_agree_with_the_code() -> None:
    docs = render(EVERYTHING)
    known = settings_variables()
    [vllm] = by_kind(docs, "StatefulSet")
    vllm_container = vllm["spec"]["template"]["spec"]["containers"][0]
    port = vllm_container["ports"][0]["containerPort"]
    adapters_path = next(m["mountPath"] for m in vllm_container["volumeMounts"] if m["name"] == "adapters")
    gateway = next(d for d in by_kind(docs, "Deployment") if d["metadata"]["name"] == "quiver-gateway")
    container = gateway["spec"]["template"]["spec"]["containers"][0]
    for workload in [gateway, *by_kind(docs, "Job")]:
        for c in workload["spec"]["template"]["spec"]["containers"]:
            quiver_env = {n for n in env_of(c) if n.startswith("QUIVER_")}
            assert quiver_env <= known, f"not settings the code reads: {quiver_env - known}"
            # vLLM loads adapters by the path the registry gives: the same mount everywhere.
            assert env_of(c)["QUIVER_STORE_DIR"] == adapters_path
            assert any(m["mountPath"] == adapters_path for m in c["volumeMounts"])
    urls = next(a for a in container["args"] if a.startswith("--vllm-url=")).removeprefix("--vllm-url=").split(",")
    assert urls == [f"http://quiver-vllm-{i}.quiver-vllm:{port}" for i in range(3)]  # each replica, by name
    assert vllm["spec"]["serviceName"] == "quiver-vllm"
    Settings(vllm_url=",".join(urls), max_lora_rank=int(env_of(container)["QUIVER_MAX_LORA_RANK"]))  # validates


def test_compose_wires_the_stack_with_settings_the_code_reads() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"vllm", "gateway", "worker", "postgres", "redis", "prometheus", "grafana"}
    gateway = services["gateway"]
    env = gateway["environment"]
    assert {k for k in env if k.startswith("QUIVER_")} <= settings_variables()
    # The gateway image has no torch: the worker (full image) trains the jobs the gateway queues, from its data dir.
    worker = services["worker"]
    assert (gateway["image"], worker["image"], services["vllm"]["image"]) == (
        "quiver:gateway",
        "quiver:cpu",
        "quiver:cpu",
    )
    assert env["QUIVER_FINE_TUNING_WORKERS"] == "0"
    data = next(v for v in gateway["volumes"] if v.endswith(f":{env['QUIVER_DATA_DIR']}"))
    assert data in worker["volumes"] and f"adapters:{env['QUIVER_STORE_DIR']}" in worker["volumes"]
    assert worker["environment"]["QUIVER_DATABASE_URL"] == env["QUIVER_DATABASE_URL"]
    worker_command = worker["command"][-1]
    assert "python -m training.worker" in worker_command
    assert f"--data-dir {env['QUIVER_DATA_DIR']} --store-dir {env['QUIVER_STORE_DIR']}" in worker_command
    vllm_port = re.search(r"--port (\d+)", services["vllm"]["command"][-1])
    assert vllm_port is not None
    assert f"http://vllm:{vllm_port.group(1)}" in gateway["command"]
    store = env["QUIVER_STORE_DIR"]
    assert f"adapters:{store}" in gateway["volumes"] and f"adapters:{store}" in services["vllm"]["volumes"]
    assert (
        env["QUIVER_DATABASE_URL"].startswith("postgresql+psycopg2://") and "@postgres:" in env["QUIVER_DATABASE_URL"]
    )
    assert env["QUIVER_REDIS_URL"].startswith("redis://redis:")
    targets = {
        t for job in yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["scrape_configs"]
        for t in job["static_configs"][0]["targets"]
    }  # fmt: skip
    assert targets == {"gateway:8000", f"vllm:{vllm_port.group(1)}"}
    assert "8000:8000" in gateway["ports"] and "--port" in gateway["command"]
    # The vLLM service finds the model directory with a snippet of Python: it must run against this code.
    [snippet] = re.findall(r"python -c '([^']+)'", services["vllm"]["command"][-1])
    assert re.findall(r"python -c '([^']+)'", worker_command) == [snippet]
    printed = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=60)
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.strip() == str(embedded.model_dir())


def test_the_dashboard_only_charts_metrics_the_gateway_exports() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "quiver.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {m for e in exprs for m in re.findall(r"\b((?:quiver|process)_[a-z_]+)", e)}
    exported = set()
    for family in Metrics().registry.collect():
        kinds = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}.get(family.type, ("",))
        exported |= {family.name + suffix for suffix in kinds} | {s.name for s in family.samples}
    missing = used - exported
    assert not missing, f"the dashboard charts metrics the gateway does not export: {missing}"
    assert {"quiver_rate_limited_total", "quiver_gateway_overhead_seconds_bucket"} <= used


def dockerfile_stages() -> dict[str, list[str]]:
    """Each stage of deploy/Dockerfile by name: its FROM line and the instructions after it, continuations joined."""
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    stages: dict[str, list[str]] = {}
    lines: list[str] = []
    for line in text.splitlines():
        named = re.match(r"^FROM \S+ AS (\w+)", line)
        if named:
            lines = stages[named.group(1)] = [line]
        elif line.strip() and not line.startswith("#"):
            lines.append(line)
    return stages


def test_the_dockerfile_has_cpu_cuda_and_gateway_targets() -> None:
    assert {"cpu", "cuda", "gateway"} <= set(dockerfile_stages())


def test_the_gateway_image_is_the_base_install_with_the_full_installs_model_cache() -> None:
    """No container engine runs here, so the image is not built: this reads what the stage would do."""
    stages = dockerfile_stages()
    gateway = stages["gateway"]
    assert gateway[0] == "FROM base AS gateway"
    [install] = [line for line in gateway if "pip install" in line]
    assert re.search(r"pip install \.(\s|$)", install), "the base install, no extras"
    assert '! python -c "import torch"' in install, "the build fails if torch came along"
    [cache] = [line for line in gateway if line.startswith("COPY --from=")]
    # The model files (and the embedder's export) `quiver model prepare` made in the full install, at the same path.
    cpu = " ".join(stages["cpu"])
    assert "quiver model prepare" in cpu and ".[cpu,training]" in cpu
    assert cache == "COPY --from=cpu /opt/quiver-cache /opt/quiver-cache"
    assert "QUIVER_CACHE_DIR=/opt/quiver-cache" in " ".join(stages["base"])
    assert gateway[-1] == 'CMD ["quiver", "up", "--vllm-url", "http://vllm:8001"]'
    # The extras the full stages install exist.
    optional = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for stage, extras in (("cpu", "cpu,training"), ("cuda", "gpu,training")):
        assert f".[{extras}]" in " ".join(stages[stage])
        assert set(extras.split(",")) <= set(optional)


def test_the_image_copies_every_package() -> None:
    packages = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    copied = set(re.findall(r"^COPY (\w+) \1$", (DEPLOY / "Dockerfile").read_text(), flags=re.MULTILINE))
    missing = {name.rstrip("*") for name in packages["include"]} - copied
    assert not missing, f"deploy/Dockerfile does not copy {missing}"
