"""Gateway configuration from ``QUIVER_*`` environment variables, validated at start-up."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gateway.policy import RoutingPolicy

# vLLM only accepts these values for --max-lora-rank.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def default_data_dir() -> Path:
    """Where the registry database and adapter store live unless configured."""
    return Path.home() / ".local" / "share" / "quiver"


class Settings(BaseSettings):
    """Everything the gateway needs to start; each field is the env var ``QUIVER_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="QUIVER_", extra="ignore")

    host: str = Field("127.0.0.1", description="Interface the gateway listens on.")
    port: int = Field(8000, ge=1, le=65535, description="Port the gateway listens on.")
    vllm_url: str = Field(
        "http://127.0.0.1:8001",
        description="Base URL of the vLLM server; several replicas of the same base model: comma-separated URLs.",
    )
    base_model: str | None = Field(
        None, description="Name vLLM serves the base model under; asked from vLLM when unset."
    )
    base_model_path: Path | None = Field(
        None, description="Base model directory; uploads are checked against its architecture."
    )
    data_dir: Path = Field(default_factory=default_data_dir, description="Registry and store root.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL of the registry; default SQLite in the data dir."
    )
    store_dir: Path | None = Field(None, description="Adapter files; default DATA_DIR/adapters.")
    max_loras: int = Field(4, ge=1, description="Adapters kept loaded in vLLM (LRU beyond this).")
    max_lora_rank: int = Field(16, description="vLLM's --max-lora-rank; larger uploads are refused.")
    connect_timeout_s: float = Field(5.0, gt=0, description="Connecting to vLLM.")
    request_timeout_s: float = Field(600.0, gt=0, description="Waiting for vLLM's next byte.")
    unreachable_after_s: float = Field(
        300.0, ge=0, description="After this long unreachable, vLLM errors are 502 instead of 503 + Retry-After."
    )
    adapter_load_timeout_s: float = Field(60.0, gt=0, description="One adapter load into vLLM.")
    adapter_slot_wait_s: float = Field(
        30.0, ge=0, description="How long a load waits for a busy replica's adapter slot to free up before 503."
    )
    health_interval_s: float = Field(1.0, gt=0, description="How often vLLM is polled.")
    registry_refresh_s: float = Field(1.0, gt=0, description="How often outside registry writes are seen.")
    max_upload_bytes: int = Field(2 * 1024**3, gt=0, description="Largest adapter archive accepted.")
    max_concurrent_uploads: int = Field(
        4,
        ge=1,
        description="Uploads (adapter archives and training files together) handled at once; one more is refused "
        "with 503 and Retry-After.",
    )
    max_body_bytes: int = Field(
        8 * 1024**2,
        gt=0,
        description="Largest request body but the uploads' (which have their own limits). A 128k-token context "
        "is under 1 MiB of JSON even as token ids; the rest is room for images as base64 data URLs.",
    )
    max_n: int = Field(
        16,
        ge=1,
        description="Most choices (n), and most completions to choose from (best_of), one request may ask for.",
    )
    promotion_margin: float = Field(
        5.0, ge=0, description="Points an adapter must beat its best eval baseline by to become name@prod."
    )
    log_level: str = Field("info", description="uvicorn log level.")
    fine_tuning_workers: int = Field(
        1, ge=0, description="Fine-tuning worker processes the gateway runs, one job each at a time; 0: none."
    )
    fine_tuning_poll_s: float = Field(1.0, gt=0, description="How often an idle fine-tuning worker looks for jobs.")
    fine_tuning_heartbeat_s: float = Field(2.0, gt=0, description="How often a running fine-tuning job reports.")
    fine_tuning_stale_after_s: float = Field(
        60.0, gt=0, description="A running job whose worker has not reported for this long is failed."
    )
    fine_tuning_stop_timeout_s: float = Field(
        30.0, gt=0, description="How long a stopping worker may take to finish its training step."
    )
    routing_file: Path | None = Field(
        None, description="TOML file of routing rules, the auto router, frontier APIs and the default fallback chain."
    )
    placement: Literal["affinity", "round_robin"] = Field(
        "affinity", description="How adapter requests pick a replica: where the adapter is loaded, or in turn."
    )
    replica_saturation: int = Field(
        8, ge=1, description="Requests in flight on a replica past which a hot adapter spreads to another one."
    )
    replica_max_in_flight: int = Field(
        64, ge=1, description="Requests in flight on a replica past which it takes no more (overload fallback)."
    )
    max_file_bytes: int = Field(512 * 1024**2, gt=0, description="Largest training file accepted by POST /v1/files.")
    rag_url: str | None = Field(
        None,
        description="RAG index: default the embedded SQLite file DATA_DIR/rag.db; a postgresql+psycopg2:// URL "
        "selects PostgreSQL with pgvector, which several gateways can share.",
    )

    admin_key: SecretStr | None = Field(
        None,
        description="A key with every scope, for bootstrapping (e.g. from a Kubernetes Secret); keys made with "
        "`quiver keys create` are stored hashed in the registry instead.",
    )
    redis_url: str | None = Field(
        None,
        description="redis://HOST:PORT/DB shared by several gateways: rate limits that hold across all of them, "
        "and residency hints (which adapters any gateway used last on each replica). Unset: in-process.",
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="Log lines as text or as JSON (one object per line, with the request id)."
    )
    otel_endpoint: str | None = Field(
        None,
        description="OTLP/HTTP collector (http://host:4318) for OpenTelemetry traces; unset: tracing off.",
    )
    usage_flush_s: float = Field(1.0, gt=0, description="How often counted usage is written to the registry.")

    @field_validator("admin_key")
    @classmethod
    def _admin_key_long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("QUIVER_ADMIN_KEY must be at least 16 characters")
        return value

    @field_validator("vllm_url")
    @classmethod
    def _url_has_scheme(cls, value: str) -> str:
        urls = [u.strip().rstrip("/") for u in value.split(",") if u.strip()]
        if not urls:
            raise ValueError("QUIVER_VLLM_URL is empty")
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"QUIVER_VLLM_URL must start with http:// or https://, got {url!r}")
        if len(set(urls)) != len(urls):
            raise ValueError(f"QUIVER_VLLM_URL lists a replica twice: {value!r}")
        return ",".join(urls)

    @field_validator("routing_file")
    @classmethod
    def _routing_file_parses(cls, value: Path | None) -> Path | None:
        RoutingPolicy.load(value)  # a ValueError names the file and the problem
        return value

    @field_validator("max_lora_rank")
    @classmethod
    def _rank_allowed_by_vllm(cls, value: int) -> int:
        if value not in VLLM_LORA_RANKS:
            raise ValueError(f"QUIVER_MAX_LORA_RANK must be one of {VLLM_LORA_RANKS}, got {value}")
        return value

    @field_validator("base_model_path")
    @classmethod
    def _base_model_dir_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not (value / "config.json").is_file():
            raise ValueError(f"QUIVER_BASE_MODEL_PATH {value} has no config.json")
        return value

    @model_validator(mode="after")
    def _heartbeats_fit(self) -> Settings:
        if self.fine_tuning_stale_after_s <= 2 * self.fine_tuning_heartbeat_s:
            raise ValueError(
                "QUIVER_FINE_TUNING_STALE_AFTER_S must be more than twice QUIVER_FINE_TUNING_HEARTBEAT_S, "
                "or a slow heartbeat fails a healthy job"
            )
        return self

    @model_validator(mode="after")
    def _derive_paths(self) -> Settings:
        self.data_dir = self.data_dir.expanduser()
        if self.store_dir is None:
            self.store_dir = self.data_dir / "adapters"
        if self.database_url is None:
            self.database_url = f"sqlite:///{self.data_dir / 'registry.db'}"
        return self

    @property
    def vllm_urls(self) -> list[str]:
        """Every replica's URL, in the configured order."""
        return self.vllm_url.split(",")

    @property
    def routing(self) -> RoutingPolicy:
        """The parsed routing file (checked at start-up)."""
        return RoutingPolicy.load(self.routing_file)

    @property
    def registry_url(self) -> str:
        """The resolved SQLAlchemy URL."""
        assert self.database_url is not None
        return self.database_url

    @property
    def adapter_store(self) -> Path:
        """The resolved adapter store directory."""
        assert self.store_dir is not None
        return self.store_dir
