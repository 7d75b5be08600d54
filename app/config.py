"""One Settings class for the API, the workers and the run command, read from ``T2I_*``."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["DEFAULT_REGISTRY", "Settings", "get_settings"]

DEFAULT_REGISTRY = Path(__file__).resolve().parent.parent / "models" / "registry.toml"


class Settings(BaseSettings):
    """Every knob of the service; each is documented in docs/service.md."""

    model_config = SettingsConfigDict(env_prefix="T2I_", extra="ignore")

    # Where things are.
    redis_url: str = Field("redis://127.0.0.1:6379/0", validation_alias="REDIS_URL")
    registry: Path = DEFAULT_REGISTRY
    key_prefix: str = "t2i"

    public_url: str | None = Field(
        None, description="base of absolute URLs in responses (else they are relative paths)"
    )

    # Access.
    api_keys: Annotated[list[str], NoDecode] = []
    rate_limit_per_minute: int = Field(120, ge=1, description="valid submissions per key")
    auth_failures_per_minute: int = Field(
        20, ge=1, description="failed authentications per client address before 429"
    )

    # Request limits.
    max_body_bytes: int = Field(1 << 20, ge=1024, description="request bodies above: 413")
    max_upload_bytes: int = Field(
        16 << 20, ge=1024, description="bodies that may carry images (edits, jobs) above: 413"
    )
    max_prompt_chars: int = Field(1000, ge=1)
    max_n: int = Field(4, ge=1)
    generation_timeout_s: float = Field(120.0, gt=0)
    compare_max_variants: int = Field(6, ge=1)
    shadow_compare_s: float = Field(
        0.0, ge=0, description="period of background compares of models with a shadow_prompt"
    )

    # Queue.
    queue_max: int = Field(64, ge=1, description="queued jobs per model variant before 429")
    job_ttl_s: int = Field(86_400, ge=1, description="how long a job's record and images live")
    reclaim_idle_s: float = Field(30.0, gt=0, description="a job idle this long is taken over")
    heartbeat_s: float = Field(2.0, gt=0)
    max_deliveries: int = Field(3, ge=1, description="deliveries before the dead-letter stream")

    # Redis.
    redis_timeout_s: float = Field(
        5.0, gt=0, description="socket timeout of ordinary Redis calls (a stalled Redis: 503)"
    )
    redis_max_connections: int = Field(
        64, ge=2, description="the API's pool for ordinary calls (streams and waits share one)"
    )

    # Worker.
    batch_max: int = Field(1, ge=1, description="queued jobs a worker may run as one batch")
    metrics_port: int = Field(0, ge=0, description="worker metrics port (0: none)")
    device: str | None = None
    torch_threads: int = Field(0, ge=0, description="torch threads per worker (0: torch's choice)")
    compile_cache_dir: Path | None = Field(
        None, description="torch.compile's cache (TORCHINDUCTOR_CACHE_DIR): restarts reuse it"
    )
    image_metadata: Literal["full", "none"] = Field(
        "full",
        description="full: images carry their parameters and what made them (app.provenance)",
    )
    step_delay_s: float = Field(
        0.0, ge=0, description="tests and drills only: sleep this long at every denoising step"
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value):
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @field_validator("public_url")
    @classmethod
    def _absolute_base(cls, value):
        if value is None or value == "":
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("public_url must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("heartbeat_s")
    @classmethod
    def _heartbeat_below_reclaim(cls, value, info):
        idle = info.data.get("reclaim_idle_s")
        if idle is not None and value * 2 > idle:
            raise ValueError("heartbeat_s must be at most half of reclaim_idle_s")
        return value


@lru_cache
def get_settings() -> Settings:
    return Settings()
