"""All configuration, from the environment (prefix GATEWAY_) or arguments to `create_app`.

Read only by the composition root (app/main.py, app/cli.py), which hands the parts what they take: the
serving core gets `limits()`, `breaker_policy()` and `lifecycle()`, never this object.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.resilience.admission import AdmissionPolicy
from app.resilience.breaker import BreakerPolicy
from app.serving.gateway import Lifecycle
from app.serving.limits import Limits
from app.serving.local_cache import LocalCache


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="forbid")

    registry: Path | None = Field(None, description="Registry YAML; unset serves the demo registry")
    default_deadline_ms: float = Field(100.0, gt=0, le=60_000, description="Fetch deadline when a request sets none")
    max_deadline_ms: float = Field(10_000.0, gt=0, description="Largest deadline a request may ask for")
    max_entities: int = Field(1000, gt=0, description="Entities (rows) per fetch")
    max_features: int = Field(500, gt=0, description="Features per fetch, after expanding group:*")
    max_write_rows: int = Field(10_000, gt=0, description="Rows per write")
    max_body_bytes: int = Field(8 * 1024 * 1024, gt=0, description="Largest request body")
    max_key_length: int = Field(256, gt=0, description="Longest string entity id")
    max_future_event_ms: float = Field(
        300_000.0, ge=0, description="How far ahead of the gateway's clock a written event time may be"
    )
    write_timeout_ms: float = Field(5_000.0, gt=0, description="Deadline for one write")
    migrate_on_start: bool = Field(True, description="Create tables at start-up (and when a backend comes back)")
    migrate_retry_s: float = Field(1.0, gt=0, description="How often to retry a backend that was down at start")
    ready_timeout_ms: float = Field(1_000.0, gt=0, description="How long /readyz waits for each backend")
    breaker_failures: int = Field(5, gt=0, description="Consecutive failures that open a backend's circuit")
    breaker_slow_ms: float = Field(
        50.0, gt=0, description="A read cancelled by the deadline after this long counts as a backend failure"
    )
    breaker_reset_ms: float = Field(1_000.0, gt=0, description="How long an open circuit waits before one probe")
    admission: bool = Field(
        True, description="Adaptive admission control: refuse (503, Retry-After) what the worker cannot serve in time"
    )
    admission_initial_limit: int = Field(16, gt=0, description="Requests in flight per worker at start")
    admission_min_limit: int = Field(4, gt=0, description="The adaptive in-flight limit never goes below this")
    admission_max_limit: int = Field(512, gt=0, description="The adaptive in-flight limit never goes above this")
    admission_tolerance: float = Field(
        1.5, ge=1.0, description="Latency up to this multiple of the measured floor is not taken for congestion"
    )
    admission_deadline_share: float = Field(
        0.5, gt=0, le=1, description="Nor is a 90th percentile latency up to this share of the deadlines asked"
    )
    admission_write_share: float = Field(
        0.5, gt=0, le=1, description="Share of the in-flight limit writes may hold (the rest is for fetches)"
    )
    freeze_heap: bool = Field(
        True, description="gc.freeze() after start-up, so full collections skip what lives as long as the process"
    )
    local_cache_entries: int = Field(
        100_000, gt=0, description="Entries each worker's local cache (groups' local_cache_ms) holds at most"
    )
    local_cache_bytes: int = Field(
        64 * 1024 * 1024, gt=0, description="Bytes each worker's local cache holds at most (blobs and keys)"
    )
    metrics_dir: str | None = Field(
        None, description="Directory where workers share metric snapshots (set by `serve`; unset: one process)"
    )
    supervisor_pid: int | None = Field(
        None,
        description="Set by `serve --workers N`: the supervisor that a POST /v1/admin/reload signals, so that every "
        "worker reloads",
    )
    api_keys: str | None = Field(
        None,
        description="API keys: a JSON list of {name, sha256, scopes, groups?} (`feature-gateway keys new` makes one); "
        "unset with api_keys_file unset: authentication is off and `serve` binds only to loopback",
    )
    api_keys_file: Path | None = Field(None, description="API keys in a YAML or JSON file (the same list)")
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Origins whose web pages may call the API (CORS), as a JSON list such as "
        '["https://console.example.com"]; empty: none, browsers refuse cross-origin calls',
    )
    service_name: str = Field("feature-gateway", description="OpenTelemetry service.name")
    trace_sample_ratio: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Share of new traces recorded (a caller's traceparent decides for its own); "
        "OTEL_TRACES_SAMPLER, when set, replaces it",
    )
    otlp_endpoint: str | None = Field(
        None, description="OTLP/HTTP endpoint; OTEL_EXPORTER_OTLP_ENDPOINT is honoured too"
    )

    def limits(self) -> Limits:
        return Limits(
            max_entities=self.max_entities,
            max_features=self.max_features,
            max_write_rows=self.max_write_rows,
            max_key_length=self.max_key_length,
            default_deadline_ms=self.default_deadline_ms,
            max_deadline_ms=self.max_deadline_ms,
            write_timeout_ms=self.write_timeout_ms,
            max_future_event_ms=self.max_future_event_ms,
        )

    def breaker_policy(self) -> BreakerPolicy:
        return BreakerPolicy(self.breaker_failures, self.breaker_reset_ms / 1000, self.breaker_slow_ms)

    def admission_policy(self) -> AdmissionPolicy:
        return AdmissionPolicy(
            enabled=self.admission,
            initial_limit=self.admission_initial_limit,
            min_limit=self.admission_min_limit,
            max_limit=max(self.admission_max_limit, self.admission_min_limit),
            tolerance=self.admission_tolerance,
            deadline_share=self.admission_deadline_share,
            write_share=self.admission_write_share,
        )

    def local_cache(self) -> LocalCache:
        """This worker's local cache; its invalidation stamps shared with the other workers in `metrics_dir`."""
        return LocalCache(self.local_cache_entries, self.local_cache_bytes, self.metrics_dir)

    def lifecycle(self) -> Lifecycle:
        return Lifecycle(self.migrate_on_start, self.migrate_retry_s, self.ready_timeout_ms / 1000)
