"""What the ingest stage does with a batch of feature-log records, without Kafka.

:class:`Summarizer` validates every push (the codec's checks, then the model's: a base
update exists, the record key, backbone and cut agree with it, labels are in its range),
turns each bad one into a dead letter with its origin and reason, and folds the good ones
into one :class:`~pipeline.records.BatchSummary` per feature-log partition. It
reads what it knows of models through a ``lookup`` callable; the Kafka shell
(``agents.ingest``) feeds it from the model topic.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from agents.aggregator import Record, dead_letter
from pipeline import codec
from pipeline.records import BatchSummary, DeadLetter, FeaturePush
from pipeline.samples import (
    MODEL_MISMATCH,
    TOO_LARGE,
    UNKNOWN_MODEL,
    FitLookup,
    ModelFit,
    Refusal,
    admit_push,
)

__all__ = ["MODEL_MISMATCH", "TOO_LARGE", "UNKNOWN_MODEL", "IngestOutcome", "Summarizer"]


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
    """Validation of pushes and their summary per model; pure apart from ``lookup``.

    ``max_push_bytes`` is the deployment's push byte limit, the one the model server
    answers 413 ``too_large`` over: one limit on both ways into the feature log.
    """

    def __init__(self, *, max_push_bytes: int, max_push_samples: int, lookup: FitLookup) -> None:
        self.max_push_bytes = max_push_bytes
        self.max_push_samples = max_push_samples
        self._lookup = lookup

    def summarize(self, records: Iterable[Record], now: float) -> IngestOutcome:
        """Validates a batch (records in partition order) and summarizes the good pushes."""
        out = IngestOutcome()
        columns: dict[int, _Columns] = {}
        fits: dict[str, ModelFit | None] = {}

        def lookup(model_id: str) -> ModelFit | None:
            if model_id not in fits:
                fits[model_id] = self._lookup(model_id)
            return fits[model_id]

        for record in records:
            out.commit[(record.topic, record.partition)] = record.offset + 1
            push = admit_push(
                record.value,
                key_model=codec.decode_key(record.key),
                lookup=lookup,
                max_push_bytes=self.max_push_bytes,
                max_push_samples=self.max_push_samples,
            )
            if isinstance(push, Refusal):
                out.dead_letters.append(dead_letter(record, push.reason, push.message, now))
                continue
            column = columns.get(record.partition)
            if column is None:
                column = columns[record.partition] = _Columns()
            column.add(record, push)
            out.pushes += 1
            out.samples += push.n
        out.summaries = [c.summary(p) for p, c in columns.items()]
        return out
