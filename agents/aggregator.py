"""What the agents do with a batch of records, without Faust: validate, count, decide.

:class:`Aggregator` turns feature-log records, model updates and clock ticks into an
:class:`Outcome` (triggers to emit, dead letters to write, per-model states to store). It
reads states through a ``load`` callable and never writes them itself: the Faust shell in
``agents.app`` publishes the outputs, waits until they are durable, and only then stores
the states and lets the source offsets commit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final

from agents.policy import ModelState, TriggerPolicy
from pipeline import codec
from pipeline.codec import Reject
from pipeline.records import DeadLetter, FeaturePush, TrainingTrigger

log = logging.getLogger(__name__)

#: Dead-letter reason of a push for a model whose base update (v0) the agents have not seen.
UNKNOWN_MODEL: Final = Reject.UNKNOWN_MODEL.value
#: Dead-letter reason of a push whose record key, backbone or cut disagrees with its model.
MODEL_MISMATCH: Final = Reject.MODEL_MISMATCH.value


@dataclass(frozen=True, slots=True)
class Record:
    """One consumed Kafka record. ``timestamp`` is its log time in seconds."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: float


@dataclass(slots=True)
class Outcome:
    """What one batch produced. ``states`` maps model id to a changed state to store."""

    triggers: list[TrainingTrigger] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    states: dict[str, ModelState] = field(default_factory=dict)
    counted_samples: int = 0
    replayed: int = 0
    #: model id → the last record of that model in the batch (the shell writes the
    #: model's state in that record's partition context).
    last_record: dict[str, Record] = field(default_factory=dict)


StateLoader = Callable[[str], ModelState | None]


class Aggregator:
    """Validation and the trigger policy over batches; pure apart from ``load``."""

    def __init__(self, policy: TriggerPolicy, *, max_push_samples: int, load: StateLoader) -> None:
        self.policy = policy
        self.max_push_samples = max_push_samples
        self._load = load

    def _state(self, cache: dict[str, ModelState | None], model_id: str) -> ModelState | None:
        if model_id not in cache:
            cache[model_id] = self._load(model_id)
        return cache[model_id]

    @staticmethod
    def _dead(record: Record, reason: str, message: str, at: float) -> DeadLetter:
        return DeadLetter(
            original=record.value or b"",
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            reason=reason,
            message=message,
            key=record.key,
            at_ms=int(at * 1000),
        )

    def add_pushes(self, records: Iterable[Record], now: float) -> Outcome:
        """Validates and counts feature pushes, then fires what became due."""
        out = Outcome()
        cache: dict[str, ModelState | None] = {}
        for record in records:
            key_model = codec.decode_key(record.key)
            state = self._state(cache, key_model) if key_model else None
            try:
                push = codec.decode_push(
                    record.value if record.value is not None else b"",
                    num_classes=state.num_classes if state is not None else None,
                    max_samples=self.max_push_samples,
                )
            except codec.CodecError as exc:
                out.dead_letters.append(self._dead(record, exc.reason.value, exc.message, now))
                continue
            problem = self._mismatch(record, key_model, push, state)
            if problem is not None:
                out.dead_letters.append(self._dead(record, *problem, now))
                continue
            assert state is not None
            counted = self.policy.agg(
                state,
                partition=record.partition,
                offset=record.offset,
                samples=push.n,
                device_id=push.device_id,
                at=record.timestamp,
            )
            if not counted:
                out.replayed += 1
                continue
            out.counted_samples += push.n
            out.states[state.model_id] = state
            out.last_record[state.model_id] = record
            # Checked after every record, not once per batch: a count trigger then
            # covers the same records however a replay happens to be batched.
            self._fire(out, state, now)
        return out

    def _mismatch(
        self, record: Record, key_model: str | None, push: FeaturePush, state: ModelState | None
    ) -> tuple[str, str] | None:
        if key_model != push.model_id:
            return (
                MODEL_MISMATCH,
                f"record key {key_model!r} is not the push's model_id {push.model_id!r}; "
                "pushes must be keyed by their model id",
            )
        if state is None or not state.known:
            return (
                UNKNOWN_MODEL,
                f"model {push.model_id!r} has no base update on the model topic yet; "
                "publish its v0 before devices push",
            )
        if push.backbone.value != state.backbone or push.cut.value != state.cut:
            return (
                MODEL_MISMATCH,
                f"push is {push.backbone}/{push.cut}, model {push.model_id!r} is "
                f"{state.backbone}/{state.cut}",
            )
        return None

    def add_update(self, record: Record, now: float) -> Outcome:
        """Folds one model update; a bad one becomes a dead letter."""
        out = Outcome()
        if record.value is None:  # a compaction tombstone
            return out
        try:
            update = codec.decode_update(record.value)
        except codec.CodecError as exc:
            out.dead_letters.append(self._dead(record, exc.reason.value, exc.message, now))
            return out
        if codec.decode_key(record.key) != update.model_id:
            log.warning(
                "model update %s/%s is keyed %r, not by its model id: its state may live in "
                "another partition than its pushes",
                update.model_id,
                update.version,
                record.key,
            )
        state = self._load(update.model_id) or self.policy.initialize(update.model_id)
        out.states[update.model_id] = state
        if state.partition is None:
            state.partition = record.partition
        if self.policy.on_update(state, update):
            log.info("job %s answered by %s/%s", update.trigger_id, update.model_id, update.version)
        out.last_record[update.model_id] = record
        self._fire(out, state, now)
        return out

    def tick(self, states: Iterable[ModelState], now: float) -> Outcome:
        """Fires age triggers and re-fires timed-out jobs among ``states``. Only states that
        changed are returned for storing."""
        out = Outcome()
        for state in states:
            trigger = self.policy.result(state, now)
            if trigger is not None:
                out.triggers.append(trigger)
                out.states[state.model_id] = state
                _log_trigger(trigger)
        return out

    def _fire(self, out: Outcome, state: ModelState, now: float) -> None:
        trigger = self.policy.result(state, now)
        if trigger is not None:
            out.triggers.append(trigger)
            _log_trigger(trigger)


def _log_trigger(trigger: TrainingTrigger) -> None:
    log.info(
        "trigger %s reason=%s attempt=%d samples=%d ranges=%s",
        trigger.trigger_id,
        trigger.reason,
        trigger.attempt,
        trigger.sample_count,
        [(r.partition, r.start, r.end) for r in trigger.ranges],
    )
