"""The trainer's last step: a judged candidate becomes a model version on the model topic.

Owns how a trained head is described (:func:`version_spec`: identity and head shape from
the registry entry, lineage from the trigger) and announced (:class:`VersionPublisher`:
checkpoint to the store, update to the topic, acknowledged before the trigger is committed).
Apart from :mod:`trainer.worker` so the consumer loop reads as the job's control flow, and
so the step that decides what a version says is one small unit.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import TYPE_CHECKING

from pipeline.publishing import PublishTarget, VersionSpec, build_update, publish_update

if TYPE_CHECKING:
    from aiokafka import AIOKafkaProducer

    from pipeline.checkpoints import CheckpointStore
    from pipeline.records import ModelUpdate, TrainingTrigger
    from pipeline.registry import ModelEntry
    from pipeline.settings import Settings
    from trainer.job import Candidate


def version_spec(
    entry: ModelEntry, trigger: TrainingTrigger, version: str, parent_version: str
) -> VersionSpec:
    """What the trigger's version is: the model's head shape (as registered), its parent
    (the champion it was trained from) and the trigger that asked for it."""
    return VersionSpec(
        model_id=trigger.model_id,
        version=version,
        backbone=entry.backbone,
        cut=entry.cut,
        num_classes=entry.num_classes,
        parent_version=parent_version,
        trigger_id=trigger.trigger_id,
    )


class VersionPublisher:
    """Stores a candidate's checkpoint and announces its version on the model topic.

    One per trainer: the target (store, model server, message limit, dtype) comes from the
    process's settings; the producer is the trainer's, passed per call because the trainer
    owns its lifecycle.
    """

    def __init__(self, settings: Settings, store: CheckpointStore, topic: str) -> None:
        self.target = PublishTarget.from_settings(settings, store)
        self.topic = topic

    async def publish(
        self,
        producer: AIOKafkaProducer,
        spec: VersionSpec,
        candidate: Candidate,
        trigger: TrainingTrigger,
    ) -> ModelUpdate:
        """Build the update (in a thread: encoding and hashing the blob would hold up the
        event loop's heartbeats), carry the trigger's ranges, and return once the broker
        acknowledged it."""
        update = await asyncio.to_thread(
            build_update,
            spec,
            self.target,
            candidate.state_dict,
            metrics=candidate.metrics(),
            is_best=candidate.verdict.is_best,
        )
        update = dataclasses.replace(update, trigger_ranges=trigger.ranges)
        await publish_update(producer, self.topic, update)
        return update
