"""One frozen settings object per process, read from ``FEDEX_*`` environment variables.

Entry points build it once (``Settings()``) and pass it down; lower-level components
take plain keyword arguments and never read the environment themselves.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DAY_MS = 24 * 60 * 60 * 1000


class Settings(BaseSettings):
    """Everything an actor may be configured with. Env var = ``FEDEX_`` + field name."""

    model_config = SettingsConfigDict(env_prefix="FEDEX_", frozen=True, extra="ignore")

    home: Path = Field(
        default=Path(".fedex"),
        description="Project data directory: Kafka jars and data, logs, checkpoints, feature banks.",
    )
    kafka_bootstrap: str | None = Field(
        default=None,
        description="bootstrap servers of an existing cluster; when set, no local broker is started.",
    )
    kafka_port: int = Field(default=9092, ge=1, le=65535, description="port of the local broker.")
    kafka_heap: str = Field(default="512m", description="JVM heap of the local broker.")
    topic_prefix: str = Field(
        default="fedex",
        pattern=r"^[A-Za-z0-9._-]{1,100}$",
        description="prefix of every topic name (tests use a unique one each).",
    )
    features_partitions: int = Field(default=6, ge=1, description="partitions of the feature log.")
    triggers_partitions: int = Field(default=6, ge=1, description="partitions of the trigger topic.")
    models_partitions: int = Field(default=6, ge=1, description="partitions of the model topic.")
    training_window_ms: int = Field(
        default=7 * DAY_MS, ge=60_000, description="retention of the feature log = the training window."
    )
    max_message_bytes: int = Field(
        default=8 * 1024 * 1024,
        ge=1024 * 1024,
        description="max message size of the model topic; larger checkpoints go by reference.",
    )
    max_push_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1024, description="max size of one feature push."
    )
    max_push_samples: int = Field(default=1024, ge=1, description="max samples in one feature push.")
    replication_factor: int = Field(default=1, ge=1, description="replication factor of created topics.")
    server_host: str = Field(default="127.0.0.1", description="address the model server binds.")
    server_port: int = Field(default=8080, ge=1, le=65535, description="port of the model server.")
    server_url: str = Field(
        default="http://127.0.0.1:8080",
        description="where devices and trainers reach the model server (checkpoints by reference).",
    )

    @property
    def bootstrap(self) -> str:
        """Where clients connect: the external cluster if configured, else the local broker."""
        return self.kafka_bootstrap or f"127.0.0.1:{self.kafka_port}"

    @property
    def uses_external_kafka(self) -> bool:
        return self.kafka_bootstrap is not None
