"""What the ingest stage does with a batch of feature-log records, without Kafka.

:class:`Summarizer` validates every push (the codec's checks, then the model's: a base
update exists, the record key, backbone and cut agree with it, labels are in its range),
turns each bad one into a dead letter with its origin and reason, and folds the good ones
into one :class:`~pipeline.records.BatchSummary` per feature-log partition. It
reads what it knows of models through a ``lookup`` callable; the Kafka shell
(``agents.ingest``) feeds it from the model topic.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final

import numpy as np

from agents.aggregator import Record, dead_letter
from pipeline import codec
from pipeline.codec import Reject
from pipeline.records import BatchSummary, DeadLetter, FeaturePush

#: Dead-letter reason of a push for a model whose base update (v0) is not on the model topic.
UNKNOWN_MODEL: Final = Reject.UNKNOWN_MODEL.value
#: Dead-letter reason of a push whose record key, backbone or cut disagrees with its model.
MODEL_MISMATCH: Final = Reject.MODEL_MISMATCH.value


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """What validating a push needs to know of its model."""

    num_classes: int
    backbone: str
    cut: str


SpecLookup = Callable[[str], ModelSpec | None]


@dataclass(slots=True)
class IngestOutcome:
    """What one batch produced: summaries and dead letters to send, and per ``(topic,
    partition)`` the offset to commit once they are durable."""

    summaries: list[BatchSummary] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    commit: dict[tuple[str, int], int] = field(default_factory=dict)
    pushes: int = 0
    samples: int = 0


@dataclass(slots=True)
class _Columns:
    """The good pushes of one partition, as they are folded."""

    model_index: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    samples: list[int] = field(default_factory=list)
    times_ms: list[int] = field(default_factory=list)
    device_index: list[int] = field(default_factory=list)
    models: dict[str, int] = field(default_factory=dict)
    devices: dict[str, int] = field(default_factory=dict)

    def add(self, record: Record, push: FeaturePush) -> None:
        self.model_index.append(self.models.setdefault(push.model_id, len(self.models)))
        self.offsets.append(record.offset)
        self.samples.append(push.n)
        self.times_ms.append(round(record.timestamp * 1000))
        self.device_index.append(self.devices.setdefault(push.device_id, len(self.devices)))

    def summary(self, partition: int) -> BatchSummary:
        return BatchSummary(
            partition=partition,
            models=tuple(self.models),
            model_index=np.array(self.model_index, dtype=np.int32),
            offsets=np.array(self.offsets, dtype=np.int64),
            samples=np.array(self.samples, dtype=np.int32),
            times_ms=np.array(self.times_ms, dtype=np.int64),
            device_index=np.array(self.device_index, dtype=np.int32),
            devices=tuple(self.devices),
        )


class Summarizer:
    """Validation of pushes and their summary per model; pure apart from ``lookup``."""

    def __init__(self, *, max_push_samples: int, lookup: SpecLookup) -> None:
        self.max_push_samples = max_push_samples
        self._lookup = lookup

    def summarize(self, records: Iterable[Record], now: float) -> IngestOutcome:
        """Validates a batch (records in partition order) and summarizes the good pushes."""
        out = IngestOutcome()
        columns: dict[int, _Columns] = {}
        specs: dict[str, ModelSpec | None] = {}
        for record in records:
            out.commit[(record.topic, record.partition)] = record.offset + 1
            key_model = codec.decode_key(record.key)
            spec = None
            if key_model is not None:
                if key_model not in specs:
                    specs[key_model] = self._lookup(key_model)
                spec = specs[key_model]
            try:
                push = codec.decode_push(
                    record.value if record.value is not None else b"",
                    num_classes=spec.num_classes if spec is not None else None,
                    max_samples=self.max_push_samples,
                )
            except codec.CodecError as exc:
                out.dead_letters.append(dead_letter(record, exc.reason.value, exc.message, now))
                continue
            problem = _mismatch(key_model, push, spec)
            if problem is not None:
                out.dead_letters.append(dead_letter(record, *problem, now))
                continue
            column = columns.get(record.partition)
            if column is None:
                column = columns[record.partition] = _Columns()
            column.add(record, push)
            out.pushes += 1
            out.samples += push.n
        out.summaries = [c.summary(p) for p, c in columns.items()]
        return out


def _mismatch(
    key_model: str | None, push: FeaturePush, spec: ModelSpec | None
) -> tuple[str, str] | None:
    if key_model != push.model_id:
        return (
            MODEL_MISMATCH,
            f"record key {key_model!r} is not the push's model_id {push.model_id!r}; "
            "pushes must be keyed by their model id",
        )
    if spec is None:
        return (
            UNKNOWN_MODEL,
            f"model {push.model_id!r} has no base update on the model topic yet; "
            "publish its v0 before devices push",
        )
    if push.backbone.value != spec.backbone or push.cut.value != spec.cut:
        return (
            MODEL_MISMATCH,
            f"push is {push.backbone}/{push.cut}, model {push.model_id!r} is "
            f"{spec.backbone}/{spec.cut}",
        )
    return None
