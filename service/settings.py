"""Server configuration: one pydantic-settings class, read from `NEUROSERVE_*` variables.

Every field can be set by an environment variable named after it with the `NEUROSERVE_`
prefix (`NEUROSERVE_PORT=9000`, `NEUROSERVE_REDIS_URL=redis://...`) or passed to
`Settings(...)` directly; keyword arguments win over the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from models.repository import default_repository_root
from service.api.auth import parse_key_entry

LogLevel = Literal["critical", "error", "warning", "info", "debug"]


class Settings(BaseSettings):
    """Everything the server reads at start-up."""

    model_config = SettingsConfigDict(env_prefix="NEUROSERVE_", extra="forbid")

    host: str = Field("127.0.0.1", description="Interface to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 picks a free one).")
    grpc_enabled: bool = Field(
        True,
        description=(
            "Serve the Open Inference Protocol over gRPC (inference.GRPCInferenceService) "
            "beside HTTP, on grpc_port and the same host."
        ),
    )
    grpc_port: int = Field(
        8001,
        ge=0,
        le=65535,
        description=(
            "TCP port of the gRPC endpoint (Triton's default, 8001; 0 picks a free one, with "
            "one worker only). Every worker process listens on it (SO_REUSEPORT)."
        ),
    )
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description=(
            "Server processes. More than one needs NEUROSERVE_REDIS_URL: state lives in Redis, "
            "so any worker continues any session; about one per core."
        ),
    )
    model_repository: Path = Field(
        default_factory=default_repository_root,
        description="Root folder of the model repository: <root>/<name>/<version>/.",
    )
    redis_url: str | None = Field(
        None,
        description="Redis URL for session state; unset uses the embedded in-process store.",
    )
    max_batch_size: int = Field(64, ge=1, description="Most sequences in one predict request.")
    max_sequence_length: int = Field(
        4096, ge=1, description="Most time steps per sequence in one request."
    )
    max_request_bytes: int = Field(
        32 * 1024 * 1024,
        ge=1024,
        description="Largest request body accepted; bigger bodies get 413.",
    )
    allow_uncalibrated: bool = Field(
        False,
        description=(
            "Serve models that have no calibration artifact for the requested backend "
            "(their predictions then carry raw softmax confidence and no prediction set)."
        ),
    )
    abstain_set_size: int = Field(
        1,
        ge=0,
        description=(
            "Abstain (`abstain: true`) when a prediction set holds more labels than this; "
            "a request's `max_set_size` overrides it."
        ),
    )
    feedback_ttl_seconds: float = Field(
        24 * 3600.0,
        gt=0,
        description="How long a prediction is remembered for label feedback (POST /v1/feedback).",
    )
    in_process_max_predictions: int = Field(
        200_000,
        ge=1,
        description=(
            "Without Redis: the most predictions kept for feedback (about 1 KB each); beyond "
            "it the oldest are dropped first and feedback on them answers 404. With Redis they "
            "are kept for the whole feedback window (bound Redis with maxmemory)."
        ),
    )
    aci_gamma: float = Field(
        0.005, gt=0.0, le=1.0, description="Step size of the online (ACI) levels per label."
    )
    conformal_key: SecretStr | None = Field(
        None,
        description=(
            "Server-held key from which each prediction's uniform draw for randomised scores "
            "is derived (HMAC of the prediction id). Replicas should share it so any of them "
            "can reproduce a served set; a random key per process when unset."
        ),
    )
    preload_models: bool = Field(
        True, description="Load the latest version of every model at start-up."
    )
    state_store_prefix: str = Field(
        "neuroserve",
        pattern=r"^[A-Za-z0-9_.:-]{1,64}$",
        description="Key prefix in the state store; replicas sharing sessions use the same one.",
    )
    session_ttl_seconds: float = Field(
        3600.0, gt=0, description="Default time to live of a session, restarted on every use."
    )
    session_max_ttl_seconds: float = Field(
        7 * 24 * 3600.0, gt=0, description="Largest ttl_seconds a client may ask for."
    )
    max_sessions: int = Field(
        100_000, ge=1, description="Most live sessions one replica creates and serves."
    )
    batching: bool = Field(
        True, description="Micro-batch concurrent session steps (false: one run per step)."
    )
    fast_paths: bool = Field(
        True,
        description=(
            "Answer well-formed session steps and predictions (POST /v1/sessions/{id}/step, "
            "/v1/models/{name}/predict) without FastAPI's per-request routing, parsing and "
            "dependency machinery (service/api/fast_paths.py); false sends them through "
            "FastAPI, which answers the same."
        ),
    )
    batch_window_ms: float = Field(
        0.0,
        ge=0,
        le=1000,
        description=(
            "How long a micro-batch waits for more steps after its first one. 0: no wait; a "
            "batch takes the steps that queued while the previous one ran (continuous batching)."
        ),
    )
    batch_max_size: int = Field(
        256,
        ge=1,
        description=(
            "Most session steps in one micro-batch. Large enough that a round of concurrent "
            "sessions fits one batch (measured: 200 sessions step 15-20% faster, with a lower "
            "p99, than at 64)."
        ),
    )
    session_cache_mb: float = Field(
        64.0,
        ge=0,
        description=(
            "Memory (MiB of state tensors) for the session states this replica last wrote: a "
            "session's next step here starts from its own write instead of reading the state "
            "back from the store (the write still checks that no one else wrote since). "
            "0: always read."
        ),
    )
    redis_pool_timeout_seconds: float = Field(
        5.0,
        gt=0,
        description=(
            "How long a request waits for a free Redis connection when the pool (64) is busy; "
            "only then does it get 503."
        ),
    )
    store_check_seconds: float = Field(
        2.0, gt=0, description="How often readiness re-checks that the state store answers."
    )
    # ---- fine-tuning jobs (service/jobs/, `neuroserve worker`) ----
    job_queue_url: str | None = Field(
        None,
        description=(
            "Redis URL of the fine-tuning job queue (RQ); unset uses redis_url. With neither, "
            "the server runs jobs itself in one local worker process."
        ),
    )
    job_queue_name: str = Field(
        "neuroserve-finetune",
        pattern=r"^[A-Za-z0-9_.:-]{1,64}$",
        description="RQ queue the server puts fine-tuning jobs on (`neuroserve worker --queues`).",
    )
    max_active_jobs: int = Field(
        4, ge=1, description="Most queued plus running fine-tuning jobs; more get 429."
    )
    job_timeout_seconds: float = Field(
        6 * 3600.0, gt=0, description="A fine-tuning job running longer than this is stopped."
    )
    job_retries: int = Field(
        0,
        ge=0,
        le=10,
        description=(
            "Re-runs of a job whose worker process died or timed out (an error in the job "
            "itself is never retried: it would fail the same way)."
        ),
    )
    job_heartbeat_seconds: float = Field(
        5.0,
        gt=0,
        le=300,
        description=(
            "How often a running job reports that it is alive; three missed beats mark it "
            "failed (or retried) as lost with its worker."
        ),
    )
    job_record_ttl_seconds: float = Field(
        7 * 24 * 3600.0, gt=0, description="How long finished job records stay readable."
    )
    max_upload_bytes: int = Field(
        16 * 1024 * 1024,
        ge=1024,
        description="Largest .npz dataset a fine-tuning job may upload (decoded bytes).",
    )
    log_level: LogLevel = Field("info", description="Log level of the server and uvicorn.")
    opentelemetry: bool = Field(
        False,
        description=(
            "Emit FastAPI's native OpenTelemetry traces, metrics and logs to the globally "
            "configured providers (set up by the OpenTelemetry SDK or `opentelemetry-instrument`). "
            "The server's own metrics are Prometheus's (GET /metrics)."
        ),
    )
    # ---- API keys and per-key limits (service/api/auth.py, service/api/limits.py) ----
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "API keys as sha256 hex digests, bare or `name:digest`, comma-separated "
            "(`neuroserve hash-key` prints one); none configured leaves the server open."
        ),
    )
    admin_api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Keys that may also run fine-tuning jobs; same format as api_keys.",
    )
    rate_limit_per_second: float = Field(
        0.0,
        ge=0,
        description="Requests a second per API key (shared by all replicas when Redis is "
        "configured, else per replica); 0 is unlimited.",
    )
    rate_limit_burst: int = Field(
        20, ge=1, description="Requests a key may send at once before the rate applies."
    )
    max_sessions_per_key: int = Field(
        1000,
        ge=1,
        description="Most live REST sessions one API key holds (across all replicas with Redis).",
    )
    max_jobs_per_key: int = Field(
        2,
        ge=1,
        description="Most queued plus running fine-tuning jobs per API key (across replicas "
        "with Redis).",
    )
    ws_max_message_bytes: int = Field(
        64 * 1024, ge=256, description="Largest websocket message accepted (close 1009)."
    )
    ws_max_messages_per_second: float = Field(
        20.0, gt=0, description="Most websocket messages a client sends a second (close 1008)."
    )

    @field_validator("api_keys", "admin_api_keys", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("api_keys", "admin_api_keys")
    @classmethod
    def _well_formed_keys(cls, value: list[str]) -> list[str]:
        for entry in value:
            parse_key_entry(entry, admin=False)
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_case_level(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("redis_url", mode="before")
    @classmethod
    def _empty_url_means_embedded(cls, value: object) -> object:
        # `NEUROSERVE_REDIS_URL=` (set but empty) is a common way to say "no Redis".
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _workers_share_state_through_redis(self) -> Settings:
        if self.workers > 1 and self.redis_url is None:
            raise ValueError(
                f"workers is {self.workers}, but every worker process would keep its own "
                "sessions and jobs in the embedded store: set NEUROSERVE_REDIS_URL "
                "(--redis-url), or serve with one worker"
            )
        return self

    @field_validator("job_queue_url", mode="before")
    @classmethod
    def _empty_queue_url_means_default(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    def job_queue_redis_url(self) -> str | None:
        """Where fine-tuning jobs are queued: job_queue_url, else redis_url, else None
        (the embedded local worker)."""
        return self.job_queue_url if self.job_queue_url is not None else self.redis_url

    def redis_url_for_logs(self) -> str | None:
        """The Redis URL with any password replaced by `***`, safe to log."""
        if self.redis_url is None:
            return None
        scheme, separator, rest = self.redis_url.partition("://")
        credentials, at, location = rest.rpartition("@")
        if not separator or not at or ":" not in credentials:
            return self.redis_url
        user = credentials.split(":", 1)[0]
        return f"{scheme}://{user}:***@{location}"
