"""Every topic of the system, its partitions and configs, in one place.

No other module spells a topic name: they ask ``Topics`` for it. ``ensure_topics``
creates what is missing and brings the configs of what exists back to the spec, so it
can run at every start-up.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from pipeline.settings import Settings

log = logging.getLogger(__name__)


class Role(enum.StrEnum):
    FEATURES = "features"
    TRIGGERS = "triggers"
    MODELS = "models"
    DEADLETTER = "deadletter"


@dataclass(frozen=True, slots=True)
class TopicSpec:
    role: Role
    name: str
    partitions: int
    replication_factor: int
    config: Mapping[str, str]
    purpose: str


@dataclass(frozen=True, slots=True)
class Topics:
    """Topic names for one deployment (one prefix)."""

    prefix: str

    def name(self, role: Role) -> str:
        return f"{self.prefix}.{role.value}"

    @property
    def features(self) -> str:
        return self.name(Role.FEATURES)

    @property
    def triggers(self) -> str:
        return self.name(Role.TRIGGERS)

    @property
    def models(self) -> str:
        return self.name(Role.MODELS)

    @property
    def deadletter(self) -> str:
        return self.name(Role.DEADLETTER)


def topic_specs(settings: Settings) -> list[TopicSpec]:
    """The specs of every topic, derived from the settings."""
    topics = Topics(settings.topic_prefix)
    rf = settings.replication_factor
    # Pushes are keyed by model id; one push must fit with headroom for the batch framing.
    feature_max = str(settings.max_push_bytes + 64 * 1024)
    return [
        TopicSpec(
            Role.FEATURES,
            topics.features,
            settings.features_partitions,
            rf,
            {
                "cleanup.policy": "delete",
                "retention.ms": str(settings.training_window_ms),
                "max.message.bytes": feature_max,
            },
            "feature+label pushes from devices; the training set (retention = training window)",
        ),
        TopicSpec(
            Role.TRIGGERS,
            topics.triggers,
            settings.triggers_partitions,
            rf,
            {"cleanup.policy": "delete", "retention.ms": str(settings.training_window_ms)},
            "training jobs emitted by the aggregation agents",
        ),
        TopicSpec(
            Role.MODELS,
            topics.models,
            settings.models_partitions,
            rf,
            {
                # Compaction keeps the latest announcement per key; the key is
                # model_id/version so every version stays in the registry's history.
                "cleanup.policy": "compact",
                "max.message.bytes": str(settings.max_message_bytes),
                "min.compaction.lag.ms": "60000",
            },
            "model updates (checkpoint inline when it fits); the model registry",
        ),
        TopicSpec(
            Role.DEADLETTER,
            topics.deadletter,
            1,
            rf,
            {
                "cleanup.policy": "delete",
                "retention.ms": str(settings.training_window_ms),
                "max.message.bytes": feature_max,
            },
            "records that failed validation, with their origin and reason",
        ),
    ]
