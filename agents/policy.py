"""The per-model trigger state and the trigger policy: pure, no Kafka, no clock of its own.

Reads like a Quix Streams aggregation: :meth:`TriggerPolicy.initialize` makes the state of a
model, :meth:`TriggerPolicy.agg` folds one counted push into it, :meth:`TriggerPolicy.on_update`
folds one model update, and :meth:`TriggerPolicy.result` decides whether a trigger (a new one
or a re-fire) is due now. Storage (the Faust table) and time (``now``) belong to the caller.

The state remembers, per feature-log partition, the next offset it has already counted: a
record redelivered after a crash (at-least-once) has an offset below it and is ignored, so
no sample is counted twice and no offset range is covered by two triggers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.records import ModelUpdate, OffsetRange, TrainingTrigger, TriggerReason

#: Distinct pending devices are tracked exactly up to this many; beyond it the count
#: saturates (it is a health signal, not an input of the policy, and the table value must
#: stay small).
MAX_TRACKED_DEVICES = 256


@dataclass(slots=True)
class InFlight:
    """The one training job of a model that has been triggered and not yet answered."""

    trigger_id: str
    ranges: tuple[OffsetRange, ...]
    sample_count: int
    reason: TriggerReason
    base_version: str | None
    emitted_at: float  # seconds, of the latest emission (re-fires move it)
    attempt: int = 1
    #: Its latest emission is known to be on the trigger topic. The state is written
    #: before the trigger is sent (write-ahead) and marked once the send is acknowledged;
    #: a new owner of the partition re-fires a job that is not.
    announced: bool = False

    def trigger(self, model_id: str, reason: TriggerReason, now: float) -> TrainingTrigger:
        """This job's trigger as emitted at ``now`` (seconds): its latest attempt."""
        return TrainingTrigger(
            model_id=model_id,
            trigger_id=self.trigger_id,
            ranges=self.ranges,
            sample_count=self.sample_count,
            reason=reason,
            base_version=self.base_version,
            attempt=self.attempt,
            created_at_ms=int(now * 1000),
        )


@dataclass(slots=True)
class ModelState:
    """Everything the agents remember about one model; the value of the per-model table.

    ``pending_ranges`` are ``[start, end)`` per partition of feature-log records counted but
    not yet in a trigger; ``next_offsets`` the offset after the last counted record per
    partition (anything below it was seen). Times are seconds since the epoch:
    ``oldest_pending_at`` is the log time of the oldest pending record.
    """

    model_id: str
    num_classes: int | None = None
    backbone: str | None = None
    cut: str | None = None
    best_version: str | None = None
    latest_version: str | None = None
    pending_samples: int = 0
    pending_ranges: dict[int, tuple[int, int]] = field(default_factory=dict)
    next_offsets: dict[int, int] = field(default_factory=dict)
    pending_devices: set[str] = field(default_factory=set)
    oldest_pending_at: float | None = None
    last_trigger_at: float | None = None
    seq: int = 0
    in_flight: InFlight | None = None
    #: Partition of the table key (= of the model's pushes and updates).
    partition: int | None = None
    counted_samples: int = 0
    counted_pushes: int = 0

    @property
    def known(self) -> bool:
        """The base update arrived: pushes can be validated against the model."""
        return self.num_classes is not None

    @property
    def distinct_devices(self) -> int:
        """Distinct devices with pending samples (saturates at MAX_TRACKED_DEVICES)."""
        return len(self.pending_devices)

    def pending_range_list(self) -> tuple[OffsetRange, ...]:
        return tuple(OffsetRange(p, s, e) for p, (s, e) in sorted(self.pending_ranges.items()))

    # Plain fields for ``pipeline.codec.encode_model_state`` (the codec knows the bytes).
    def to_fields(self) -> dict[str, Any]:
        flight = self.in_flight
        return {
            "model_id": self.model_id,
            "num_classes": self.num_classes,
            "backbone": self.backbone,
            "cut": self.cut,
            "best_version": self.best_version,
            "latest_version": self.latest_version,
            "pending_samples": self.pending_samples,
            "pending_ranges": [[p, s, e] for p, (s, e) in sorted(self.pending_ranges.items())],
            "next_offsets": [[p, o] for p, o in sorted(self.next_offsets.items())],
            "pending_devices": sorted(self.pending_devices),
            "oldest_pending_at": self.oldest_pending_at,
            "last_trigger_at": self.last_trigger_at,
            "seq": self.seq,
            "in_flight": None
            if flight is None
            else {
                "trigger_id": flight.trigger_id,
                "ranges": [[r.partition, r.start, r.end] for r in flight.ranges],
                "sample_count": flight.sample_count,
                "reason": flight.reason.value,
                "base_version": flight.base_version,
                "emitted_at": flight.emitted_at,
                "attempt": flight.attempt,
                "announced": flight.announced,
            },
            "partition": self.partition,
            "counted_samples": self.counted_samples,
            "counted_pushes": self.counted_pushes,
        }

    @classmethod
    def from_fields(cls, f: Mapping[str, Any]) -> ModelState:
        raw = f.get("in_flight")
        flight = (
            None
            if raw is None
            else InFlight(
                trigger_id=raw["trigger_id"],
                ranges=tuple(OffsetRange(int(p), int(s), int(e)) for p, s, e in raw["ranges"]),
                sample_count=int(raw["sample_count"]),
                reason=TriggerReason(raw["reason"]),
                base_version=raw["base_version"],
                emitted_at=float(raw["emitted_at"]),
                attempt=int(raw["attempt"]),
                announced=bool(raw.get("announced", True)),
            )
        )
        return cls(
            model_id=f["model_id"],
            num_classes=f.get("num_classes"),
            backbone=f.get("backbone"),
            cut=f.get("cut"),
            best_version=f.get("best_version"),
            latest_version=f.get("latest_version"),
            pending_samples=int(f.get("pending_samples", 0)),
            pending_ranges={int(p): (int(s), int(e)) for p, s, e in f.get("pending_ranges", [])},
            next_offsets={int(p): int(o) for p, o in f.get("next_offsets", [])},
            pending_devices=set(f.get("pending_devices", [])),
            oldest_pending_at=f.get("oldest_pending_at"),
            last_trigger_at=f.get("last_trigger_at"),
            seq=int(f.get("seq", 0)),
            in_flight=flight,
            partition=f.get("partition"),
            counted_samples=int(f.get("counted_samples", 0)),
            counted_pushes=int(f.get("counted_pushes", 0)),
        )


@dataclass(frozen=True, slots=True)
class TriggerPolicy:
    """When to train: ``min_samples`` pending fire a count trigger; ``age_floor_samples``
    pending whose oldest record is ``max_age_s`` old fire an age trigger; at most one job per
    model is in flight, and one not answered within ``job_timeout_s`` is fired again with the
    same trigger id and ``attempt + 1``."""

    min_samples: int
    age_floor_samples: int
    max_age_s: float
    job_timeout_s: float

    @classmethod
    def from_settings(cls, settings: Any) -> TriggerPolicy:
        return cls(
            min_samples=settings.min_samples,
            age_floor_samples=settings.age_floor_samples,
            max_age_s=settings.max_age_s,
            job_timeout_s=settings.job_timeout_s,
        )

    def initialize(self, model_id: str) -> ModelState:
        return ModelState(model_id=model_id)

    def agg(
        self,
        state: ModelState,
        *,
        partition: int,
        offset: int,
        samples: int,
        device_id: str,
        at: float,
    ) -> bool:
        """Counts one push at ``partition``/``offset`` logged at ``at``. Returns False (and
        changes nothing) for a record already counted: a redelivery."""
        if offset < state.next_offsets.get(partition, 0):
            return False
        state.next_offsets[partition] = offset + 1
        start, _ = state.pending_ranges.get(partition, (offset, offset))
        state.pending_ranges[partition] = (start, offset + 1)
        state.pending_samples += samples
        state.counted_samples += samples
        state.counted_pushes += 1
        if len(state.pending_devices) < MAX_TRACKED_DEVICES:
            state.pending_devices.add(device_id)
        if state.oldest_pending_at is None or at < state.oldest_pending_at:
            state.oldest_pending_at = at
        state.partition = partition
        return True

    def on_update(self, state: ModelState, update: ModelUpdate) -> bool:
        """Folds a model update. Returns True when it answers the job in flight (which
        then ends); an update for any other trigger id leaves the job running."""
        state.num_classes = update.num_classes
        state.backbone = update.backbone.value
        state.cut = update.cut.value
        state.latest_version = update.version
        if update.is_best or state.best_version is None:
            state.best_version = update.version
        flight = state.in_flight
        if flight is not None and update.trigger_id == flight.trigger_id:
            state.in_flight = None
            return True
        return False

    def refire(self, state: ModelState, now: float) -> TrainingTrigger | None:
        """The job in flight emitted again, or None when there is none: same trigger id,
        ranges, sample count and base version as its first emission (only the attempt and
        the emission time move), so a trainer that sees it twice trains it once."""
        flight = state.in_flight
        if flight is None:
            return None
        flight.attempt += 1
        flight.emitted_at = now
        flight.announced = False
        return flight.trigger(state.model_id, TriggerReason.RETRY, now)

    def due(self, state: ModelState, now: float) -> TriggerReason | None:
        """The reason a trigger is due now, or None."""
        if not state.known:
            return None
        if state.in_flight is not None:
            if now - state.in_flight.emitted_at >= self.job_timeout_s:
                return TriggerReason.RETRY
            return None
        if state.pending_samples >= self.min_samples:
            return TriggerReason.COUNT
        if (
            state.pending_samples >= self.age_floor_samples
            and state.oldest_pending_at is not None
            and now - state.oldest_pending_at >= self.max_age_s
        ):
            return TriggerReason.AGE
        return None

    def result(self, state: ModelState, now: float) -> TrainingTrigger | None:
        """The trigger to emit now, if any, with the state moved on: pending data becomes
        the job in flight, or the job in flight is re-fired."""
        reason = self.due(state, now)
        if reason is None:
            return None
        if reason is TriggerReason.RETRY:
            return self.refire(state, now)
        state.seq += 1
        flight = InFlight(
            trigger_id=f"{state.model_id}:{state.seq}",
            ranges=state.pending_range_list(),
            sample_count=state.pending_samples,
            reason=reason,
            base_version=state.best_version,
            emitted_at=now,
        )
        state.in_flight = flight
        state.last_trigger_at = now
        state.pending_samples = 0
        state.pending_ranges.clear()
        state.pending_devices.clear()
        state.oldest_pending_at = None
        return flight.trigger(state.model_id, reason, now)
