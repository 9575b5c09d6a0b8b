"""What the Faust agent does with its events, without Faust: count, decide.

:class:`Aggregator` turns batch summaries (the ingest stage's digest of validated feature
pushes, see ``agents.summarizer``), model updates and clock ticks into an :class:`AggregatorOutput`
(triggers to emit, dead letters to write, per-model states to store). It reads states
through a ``load`` callable and never writes them itself: the Faust shell in ``agents.app``
publishes the outputs, waits until they are durable, and only then stores the states and
lets the source offsets commit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agents.policy import ModelState, TriggerPolicy
from pipeline import codec
from pipeline.records import DeadLetter, TrainingTrigger

if TYPE_CHECKING:
    from aiokafka.structs import ConsumerRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Record:
    """One consumed Kafka record. ``timestamp`` is its log time in seconds."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: float

    @classmethod
    def of_consumer_record(cls, record: ConsumerRecord[Any, Any]) -> Record:
        """An aiokafka record (the ingest stage's input; its timestamp is in ms)."""
        r = record
        return cls(r.topic, r.partition, r.offset, r.key, r.value, r.timestamp / 1000)

    @classmethod
    def of_faust_event(cls, event: Any) -> Record:
        """A Faust event's message (the agents' input; its timestamp is in seconds)."""
        m = event.message
        return cls(m.topic, m.partition, m.offset, m.key, m.value, float(m.timestamp))


def dead_letter(record: Record, reason: str, message: str, at: float) -> DeadLetter:
    """The dead letter of ``record``: its bytes, origin and why it was rejected."""
    return DeadLetter.of(record, reason=reason, message=message, at_ms=int(at * 1000))


@dataclass(slots=True)
class AggregatorOutput:
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
    """The trigger policy over batches of summaries, updates and ticks; pure apart from
    ``load``."""

    def __init__(self, policy: TriggerPolicy, *, load: StateLoader) -> None:
        self.policy = policy
        self._load = load

    def add_summaries(self, records: Iterable[Record], now: float) -> AggregatorOutput:
        """Counts the pushes of batch summaries, then fires what became due. A push whose
        offset was already counted (a replayed summary) is skipped."""
        out = AggregatorOutput()
        cache: dict[str, ModelState] = {}
        for record in records:
            try:
                summary = codec.decode_summary(record.value if record.value is not None else b"")
            except codec.CodecError as exc:
                out.dead_letters.append(dead_letter(record, exc.reason.value, exc.message, now))
                continue
            # One state per model of the summary, loaded once per batch. A model whose update
            # this partition has not folded yet is counted all the same (the ingest stage
            # found it on the model topic); it fires once known.
            states = [self._state(cache, m) for m in summary.models]
            devices = summary.devices
            columns = zip(
                summary.model_index.tolist(),
                summary.offsets.tolist(),
                summary.samples.tolist(),
                summary.times_ms.tolist(),
                summary.device_index.tolist(),
                strict=True,
            )
            for model, offset, samples, at_ms, device in columns:
                state = states[model]
                counted = self.policy.agg(
                    state,
                    partition=summary.partition,
                    offset=offset,
                    samples=samples,
                    device_id=devices[device],
                    at=at_ms / 1000,
                )
                if not counted:
                    out.replayed += 1
                    continue
                out.counted_samples += samples
                out.states[state.model_id] = state
                out.last_record[state.model_id] = record
                # Checked after every push, not once per summary: a count trigger then
                # covers the same pushes however the ingest stage happened to batch them.
                self._fire(out, state, self.policy.result(state, now))
        return out

    def _state(self, cache: dict[str, ModelState], model_id: str) -> ModelState:
        state = cache.get(model_id)
        if state is None:
            state = cache[model_id] = self._load(model_id) or self.policy.initialize(model_id)
        return state

    def add_update(self, record: Record, now: float) -> AggregatorOutput:
        """Folds one model update; a bad one becomes a dead letter."""
        out = AggregatorOutput()
        if record.value is None:  # a compaction tombstone
            return out
        try:
            update = codec.decode_update(record.value)
        except codec.CodecError as exc:
            out.dead_letters.append(dead_letter(record, exc.reason.value, exc.message, now))
            return out
        # Keyed <model_id>/<version>, or by the model id alone on topics written before.
        key = codec.decode_update_key(record.key)
        if key is None or key[0] != update.model_id or key[1] not in (None, update.version):
            log.warning(
                "model update %s/%s is keyed %r, not by its model id and version: its state "
                "may live in another partition than its pushes",
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
        self._fire(out, state, self.policy.result(state, now))
        return out

    def tick(self, states: Iterable[ModelState], now: float) -> AggregatorOutput:
        """Fires age triggers and re-fires timed-out jobs among ``states``. Only states that
        changed are returned for storing."""
        out = AggregatorOutput()
        for state in states:
            self._fire(out, state, self.policy.result(state, now))
        return out

    def take_over(self, states: Iterable[ModelState], now: float) -> AggregatorOutput:
        """What a worker does first with the states of a partition it was newly assigned:
        re-fires every job in flight whose trigger is not known to be on the topic (the
        previous owner died between writing the state and the send's acknowledgement),
        then ticks."""
        out = AggregatorOutput()
        for state in states:
            flight = state.in_flight
            trigger = None
            if flight is not None and not flight.announced:
                trigger = self.policy.refire(state, now)
            if trigger is None:
                trigger = self.policy.result(state, now)
            self._fire(out, state, trigger)
        return out

    @staticmethod
    def _fire(out: AggregatorOutput, state: ModelState, trigger: TrainingTrigger | None) -> None:
        """Emit ``trigger``, if any, with the state that names it (stored)."""
        if trigger is not None:
            out.triggers.append(trigger)
            out.states[state.model_id] = state
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
