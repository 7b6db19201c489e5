"""Prometheus metrics of one gateway, on a registry of its own (no process globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

# Latency buckets from sub-millisecond proxy answers to long generations.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


def target_kind(served_by: str) -> str:
    """What kind of target a ``served_by`` names: ``merged:x@v1``, ``rag:c``, ``frontier:n``, ``x@v1``, the base."""
    if served_by == "none":
        return "none"
    prefix, sep, _ = served_by.partition(":")
    if sep and prefix in ("merged", "rag", "frontier"):
        return prefix
    return "adapter" if "@v" in served_by else "base"


class Metrics:
    """Request, latency, token and adapter-residency metrics, labelled by model and adapter.

    ``model`` is the string the client asked for; ``adapter`` is what served it
    (``name@vN``, or ``base``).
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # process_resident_memory_bytes and friends: what a soak test watches for leaks.
        ProcessCollector(registry=r)
        self.requests = Counter(
            "quiver_requests",
            "Requests answered, by outcome.",
            ["endpoint", "model", "adapter", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "quiver_request_duration_seconds",
            "Time from request to last byte.",
            ["endpoint", "model", "adapter"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "quiver_time_to_first_token_seconds",
            "Time from request to first streamed chunk.",
            ["endpoint", "model", "adapter"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "quiver_tokens",
            "Tokens processed, by kind (prompt or completion).",
            ["model", "adapter", "kind"],
            registry=r,
        )
        self.adapter_loads = Counter(
            "quiver_adapter_loads",
            "Adapter loads into vLLM, by outcome.",
            ["adapter", "outcome"],
            registry=r,
        )
        self.adapter_load_seconds = Histogram(
            "quiver_adapter_load_duration_seconds",
            "Time to load one adapter into vLLM.",
            ["adapter"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.adapter_unloads = Counter(
            "quiver_adapter_unloads",
            "Adapters unloaded from vLLM to make room.",
            ["adapter"],
            registry=r,
        )
        self.adapters_resident = Gauge(
            "quiver_adapters_resident",
            "Adapters currently loaded in vLLM, by replica.",
            ["replica"],
            registry=r,
        )
        self.upstream_up = Gauge(
            "quiver_upstream_up",
            "1 while vLLM answers its health check.",
            ["upstream"],
            registry=r,
        )

        self.fallbacks = Counter(
            "quiver_fallbacks",
            "Requests answered by a later target of their plan, by why the earlier ones could not and who answered.",
            ["reason", "target"],
            registry=r,
        )
        # Per tenant and kind of target, apart from the per-model series: tenants x models would multiply labels.
        self.tenant_requests = Counter(
            "quiver_tenant_requests",
            "Requests answered, by tenant, kind of target (base, adapter, merged, rag, frontier, none) and status.",
            ["tenant", "target", "status"],
            registry=r,
        )
        self.tenant_tokens = Counter(
            "quiver_tenant_tokens",
            "Tokens processed, by tenant, kind of target and kind (prompt or completion).",
            ["tenant", "target", "kind"],
            registry=r,
        )
        self.overhead = Histogram(
            "quiver_gateway_overhead_seconds",
            "The gateway's own time per request before it is sent upstream: parsing, routing, planning.",
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1),
            registry=r,
        )
        self.rate_limited = Counter(
            "quiver_rate_limited",
            "Requests refused with 429, by tenant and the limit that was full.",
            ["tenant", "limit"],
            registry=r,
        )
        self.replica_in_flight = Gauge(
            "quiver_replica_in_flight",
            "Requests the gateway has in flight on each vLLM replica.",
            ["replica"],
            registry=r,
        )

    def observe_tenant(self, tenant: str, served_by: str, status: int, prompt: int = 0, completion: int = 0) -> None:
        """One answered request in the per-tenant series."""
        target = target_kind(served_by)
        self.tenant_requests.labels(tenant, target, str(status)).inc()
        if prompt:
            self.tenant_tokens.labels(tenant, target, "prompt").inc(prompt)
        if completion:
            self.tenant_tokens.labels(tenant, target, "completion").inc(completion)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
