"""One trigger id, one set of offset ranges, forever: the trainer's side of it.

:class:`TriggerLedger` remembers the ranges of every trigger id the trainer saw, on the
trigger topic or in a published version's ``trigger_ranges`` (so a fresh trainer knows the
ids trained before it started). A trigger whose id it has seen with other ranges would
train another sample set under the same version: it is refused, dead-lettered with reason
``trigger_conflict`` and counted, never trained. Undecodable triggers are refused the same
way with the codec's reason.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter

from pipeline import codec
from pipeline.records import DeadLetter, ModelUpdate, OffsetRange, TrainingTrigger

if TYPE_CHECKING:
    from aiokafka import AIOKafkaProducer
    from aiokafka.structs import ConsumerRecord

log = logging.getLogger(__name__)


class Refused(Exception):
    """The trigger is dead-lettered and committed, never trained: ``reason`` says why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def format_ranges(ranges: tuple[OffsetRange, ...]) -> str:
    return ", ".join(f"{r.partition}:[{r.start},{r.end})" for r in ranges) or "no ranges"


class TriggerLedger:
    """Trigger id → ranges, the check, and the dead letter of a refused trigger."""

    def __init__(self, deadletter_topic: str, registry: CollectorRegistry) -> None:
        self._topic = deadletter_topic
        self._ranges: dict[str, tuple[OffsetRange, ...]] = {}
        self._refused = Counter(
            "fedex_trainer_triggers_refused",
            "Triggers dead-lettered instead of trained, by reason "
            "(trigger_conflict: an id seen with other ranges; or the codec's reason).",
            ["reason"],
            registry=registry,
        )

    def learn(self, update: ModelUpdate) -> None:
        """A published version names the ranges its trigger had."""
        if update.trigger_id is not None and update.trigger_ranges:
            self._ranges.setdefault(update.trigger_id, update.trigger_ranges)

    def check(self, trigger: TrainingTrigger) -> None:
        """Raises :class:`Refused` if the trigger's id was seen with other ranges."""
        seen = self._ranges.setdefault(trigger.trigger_id, trigger.ranges)
        if seen != trigger.ranges:
            raise Refused(
                codec.Reject.TRIGGER_CONFLICT.value,
                f"trigger {trigger.trigger_id} (attempt {trigger.attempt}) names "
                f"{format_ranges(trigger.ranges)}, but this id was seen with "
                f"{format_ranges(seen)}: a trigger id has one set of ranges; the agents' "
                "bookkeeping is wrong",
            )

    async def refuse(
        self,
        producer: AIOKafkaProducer | None,
        record: ConsumerRecord[Any, Any],
        reason: str,
        message: str,
    ) -> None:
        """Dead-letter a trigger record that must not be trained (acknowledged), and
        count it."""
        log.error(
            "refusing the trigger at %s[%d]@%d: %s: %s",
            record.topic, record.partition, record.offset, reason, message,
        )  # fmt: skip
        letter = DeadLetter.of(record, reason=reason, message=message)
        assert producer is not None, "start the trainer first"
        await producer.send_and_wait(self._topic, codec.encode_dead_letter(letter), key=record.key)
        self._refused.labels(reason).inc()
