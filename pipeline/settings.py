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
        description="data directory: Kafka jars and data, logs, checkpoints, feature banks.",
    )
    kafka_bootstrap: str | None = Field(
        default=None,
        description="bootstrap of an existing cluster; when set, no local broker is started.",
    )
    kafka_port: int = Field(default=9092, ge=1, le=65535, description="port of the local broker.")
    kafka_heap: str = Field(default="512m", description="JVM heap of the local broker.")
    topic_prefix: str = Field(
        default="fedex",
        pattern=r"^[A-Za-z0-9._-]{1,100}$",
        description="prefix of every topic name (tests use a unique one each).",
    )
    features_partitions: int = Field(default=6, ge=1, description="partitions of the feature log.")
    triggers_partitions: int = Field(
        default=6, ge=1, description="partitions of the trigger topic."
    )
    models_partitions: int = Field(default=6, ge=1, description="partitions of the model topic.")
    training_window_ms: int = Field(
        default=7 * DAY_MS,
        ge=60_000,
        description="retention of the feature log = the training window.",
    )
    max_message_bytes: int = Field(
        default=8 * 1024 * 1024,
        ge=1024 * 1024,
        description="max message size of the model topic; larger checkpoints go by reference.",
    )
    max_push_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1024, description="max size of one feature push."
    )
    max_push_samples: int = Field(
        default=1024, ge=1, description="max samples in one feature push."
    )
    replication_factor: int = Field(
        default=1, ge=1, description="replication factor of created topics."
    )
    server_host: str = Field(default="127.0.0.1", description="address the model server binds.")
    server_port: int = Field(default=8080, ge=1, le=65535, description="port of the model server.")
    server_url: str = Field(
        default="http://127.0.0.1:8080",
        description="where devices and trainers reach the model server (checkpoints by reference).",
    )

    # Aggregation agents (fedex worker).
    min_samples: int = Field(
        default=1000, ge=1, description="pending samples that fire a count trigger."
    )
    age_floor_samples: int = Field(
        default=100, ge=1, description="pending samples needed before an age trigger may fire."
    )
    max_age_s: float = Field(
        default=300.0, gt=0, description="oldest pending sample age that fires an age trigger."
    )
    job_timeout_s: float = Field(
        default=600.0, gt=0, description="a trigger with no model update after this is fired again."
    )
    agent_tick_s: float = Field(
        default=1.0, gt=0, description="how often agents check age and timeouts."
    )
    worker_port: int = Field(default=6066, ge=1, le=65535, description="Faust worker web port.")
    trainer_metrics_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="port of a trainer's Prometheus /metrics (0 = not served; one per trainer).",
    )
    # Aggregation agents: the ingest stage that validates and summarizes the feature log.
    ingest_batch_max: int = Field(
        default=2000,
        ge=1,
        description="pushes the agents' ingest stage validates per batch, at most.",
    )
    ingest_linger_ms: int = Field(
        default=5,
        ge=0,
        description="how long the ingest stage waits for more pushes once a batch has some.",
    )

    # Trainer (fedex trainer).
    train_epochs: int = Field(default=5, ge=1, description="epochs per training job.")
    train_batch_size: int = Field(default=256, ge=1, description="minibatch size.")
    train_lr: float = Field(default=1e-3, gt=0, description="AdamW learning rate.")
    train_weight_decay: float = Field(default=1e-4, ge=0, description="AdamW weight decay.")
    val_fraction: float = Field(
        default=0.1,
        gt=0,
        lt=1,
        description="share of the other devices' samples (by hash of device id + sample id) "
        "held out for validation, besides the validation devices' samples; never trained on.",
    )
    val_device_fraction: float = Field(
        default=0.1,
        ge=0,
        lt=1,
        description="share of a model's devices (by hash of model id + device id) whose samples "
        "are all held out for validation (0 = none); never trained on.",
    )
    val_max_samples: int = Field(
        default=2048,
        ge=1,
        description="size of a model's validation set: its first validation samples in log "
        "order, the same for champion and challenger and across versions once full (until "
        "then it grows with the log).",
    )
    replay_max_samples: int = Field(
        default=4096,
        ge=0,
        description="samples of earlier jobs of the model replayed next to a job's new ones, at "
        "most (label- and device-stratified, drawn from the retained log; 0 = new samples only).",
    )
    promote_margin: float = Field(
        default=0.005,
        ge=0,
        lt=1,
        description="validation accuracy a challenger must beat its champion by, strictly, to "
        "become the best version (a tie is not a win).",
    )
    train_swa_start: float | None = Field(
        default=None,
        ge=0,
        lt=1,
        description="dense weight averaging of the head (SWA/SWAD): average the weights over "
        "every step from this fraction of a job's steps on (unset = the last step's weights).",
    )
    checkpoint_dtype: str = Field(
        default="float16",
        pattern=r"^(float16|float32)$",
        description="dtype of published checkpoints.",
    )

    # Model server (fedex serve).
    auth_secret: str | None = Field(
        default=None,
        description="HMAC secret of device tokens; unset = random per server start (dev only).",
    )
    token_ttl_s: int = Field(
        default=7 * 24 * 3600, ge=60, description="lifetime of issued device tokens."
    )
    server_header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="a connection must send a whole request head (request line and headers) "
        "within this of its first byte, or of opening; else the model server answers 408 and "
        "closes it (slow-header clients).",
    )
    server_body_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="a push body must arrive within this of its head; else 408 and the "
        "connection is closed (slow-body clients; a 4 MiB push needs about 70 KB/s).",
    )
    server_max_connections_per_ip: int = Field(
        default=128,
        ge=1,
        description="connections one peer address may hold open to the model server at once; "
        "the next gets 429 and is closed (raise it for many devices behind one NAT).",
    )
    server_keepalive_timeout_s: float = Field(
        default=75.0,
        gt=0,
        description="an idle kept-alive connection to the model server is closed after this.",
    )

    # Device fleet (fedex devices).
    fleet_time_scale: float = Field(
        default=480.0,
        gt=0,
        description="simulated seconds per wall second (480: a simulated day every 3 minutes).",
    )
    fleet_send_timeout_s: float = Field(
        default=10.0, gt=0, description="a push not acknowledged within this is retried."
    )

    @property
    def checkpoint_dir(self) -> Path:
        return self.home / "checkpoints"

    @property
    def bank_dir(self) -> Path:
        return self.home / "banks"

    @property
    def state_dir(self) -> Path:
        return self.home / "state"

    @property
    def log_dir(self) -> Path:
        return self.home / "logs"

    @property
    def bootstrap(self) -> str:
        """Where clients connect: the external cluster if configured, else the local broker."""
        return self.kafka_bootstrap or f"127.0.0.1:{self.kafka_port}"

    @property
    def uses_external_kafka(self) -> bool:
        return self.kafka_bootstrap is not None
