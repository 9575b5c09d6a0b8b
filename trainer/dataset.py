"""Dataset assembly: feature-log records → one model's training set. Pure, no Kafka.

The feature log is the training set. A trigger names the offset ranges of the log it
covers; the trainer reads those records and hands them to a :class:`FeatureCache`, one per
model, which decodes the model's pushes into columnar arrays (features, labels, sample
keys) and remembers which offsets of each partition it already holds, so the next job of
that model only reads what it has not seen (:meth:`FeatureCache.missing`).

Rules, all deterministic so that any trainer assembles the same dataset for a trigger
(they are :mod:`pipeline.samples`', which ``fedex audit`` applies too):

* Records of other models (pushes share partitions, keyed by model id) are skipped, as
  are pushes that do not decode or do not fit the model (backbone, cut, label range): the
  agents dead-letter those, the trainer only counts them.
* A sample is identified by ``(device_id, sample_id)``; when it occurs more than once (a
  device re-sent a push it got no acknowledgement for), the copy at the lowest
  ``(partition, offset)`` is the sample, whatever order the records were read in.
* A job's *new* samples are those whose first occurrence lies inside the job's ranges
  (:meth:`FeatureCache.select`): a copy inside later ranges was trained by the earlier
  job, so every sample is new in exactly one job. The trainer therefore reads a model's
  partitions from the start of the log (once; the cache keeps what it read).
* A job's *window* is every sample held in its ranges' partitions below the ranges' ends,
  in log order (:meth:`FeatureCache.window`): its new samples, the samples of earlier jobs
  it may replay, and the model's validation set (:mod:`trainer.replay` plans the job;
  :class:`pipeline.samples.ValidationRule` says which samples are validation, and
  :meth:`FeatureCache.validation` keeps that per row so it is hashed once).
"""

from __future__ import annotations

import bisect
import collections
import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from pipeline import codec
from pipeline.records import FEATURE_SHAPES, Backbone, Cut, FeaturePush, OffsetRange
from pipeline.samples import (
    OTHER_MODEL,
    ModelFit,
    ValidationRule,
    accept_push,
    split_train_val,
)

# --------------------------------------------------------------------------- offsets


class OffsetSet:
    """Offsets held, per partition, as sorted disjoint half-open intervals."""

    def __init__(self) -> None:
        self._starts: dict[int, list[int]] = {}
        self._ends: dict[int, list[int]] = {}

    def add(self, partition: int, start: int, end: int) -> None:
        if end <= start:
            return
        starts = self._starts.setdefault(partition, [])
        ends = self._ends.setdefault(partition, [])
        if starts and ends[-1] >= start and starts[-1] <= start:  # the common case: appending
            ends[-1] = max(ends[-1], end)
            return
        # Intervals touching [start, end) merge with it.
        lo = bisect.bisect_left(ends, start)
        hi = bisect.bisect_right(starts, end)
        if lo < hi:
            start = min(start, starts[lo])
            end = max(end, ends[hi - 1])
        starts[lo:hi] = [start]
        ends[lo:hi] = [end]

    def contains(self, partition: int, offset: int) -> bool:
        starts = self._starts.get(partition)
        if not starts:
            return False
        i = bisect.bisect_right(starts, offset) - 1
        return i >= 0 and offset < self._ends[partition][i]

    def missing(self, wanted: OffsetRange) -> list[OffsetRange]:
        """The parts of ``wanted`` not held, in offset order."""
        starts = self._starts.get(wanted.partition, [])
        ends = self._ends.get(wanted.partition, [])
        gaps: list[OffsetRange] = []
        at = wanted.start
        i = bisect.bisect_right(ends, at)
        while at < wanted.end:
            if i >= len(starts) or starts[i] >= wanted.end:
                gaps.append(OffsetRange(wanted.partition, at, wanted.end))
                break
            if starts[i] > at:
                gaps.append(OffsetRange(wanted.partition, at, starts[i]))
            at = max(at, ends[i])
            i += 1
        return gaps

    def intervals(self, partition: int) -> list[tuple[int, int]]:
        return list(
            zip(self._starts.get(partition, []), self._ends.get(partition, []), strict=True)
        )

    def partitions(self) -> list[int]:
        return sorted(p for p, s in self._starts.items() if s)

    def forget_before(self, partition: int, offset: int) -> None:
        """Drop everything below ``offset`` (the log's retention moved past it)."""
        for start, end in self.intervals(partition):
            if start >= offset:
                break
            self._remove(partition, start, min(end, offset))

    def _remove(self, partition: int, start: int, end: int) -> None:
        starts, ends = self._starts[partition], self._ends[partition]
        i = starts.index(start)
        if end >= ends[i]:
            del starts[i], ends[i]
        else:
            starts[i] = end


# --------------------------------------------------------------------------- dataset


@dataclass(frozen=True, slots=True, eq=False)
class Dataset:
    """Samples of one model, columnar: ``features`` (N, *feature_shape) in the pushes' dtype
    (float16 as devices send it; the recipe converts once on the training device),
    ``labels`` (N,), and the dedupe keys ``(device_ids[i], sample_ids[i])``."""

    features: npt.NDArray[np.floating]
    labels: npt.NDArray[np.int64]
    device_ids: tuple[str, ...]
    sample_ids: npt.NDArray[np.uint64]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def keys(self) -> list[tuple[str, int]]:
        return list(zip(self.device_ids, self.sample_ids.tolist(), strict=True))

    def take(self, index: npt.NDArray[np.intp] | npt.NDArray[np.bool_]) -> Dataset:
        rows = np.flatnonzero(index) if index.dtype == np.bool_ else np.asarray(index)
        return Dataset(
            features=self.features[rows],
            labels=self.labels[rows],
            device_ids=tuple(self.device_ids[i] for i in rows.tolist()),
            sample_ids=self.sample_ids[rows],
        )

    def split(self, val_fraction: float, *, salt: str = "") -> tuple[Dataset, Dataset]:
        """(train, validation) by the stable hash of each sample's key: a sample stays on its
        side as the dataset grows, so champion and challenger are judged on data neither
        trained on."""
        mask = split_train_val(self.keys, val_fraction, salt=salt)
        return self.take(~mask), self.take(mask)


# --------------------------------------------------------------------------- the cache


class AddResult(enum.StrEnum):
    """What :meth:`FeatureCache.add_record` did with a record."""

    ADDED = "added"  # at least one new sample
    DUPLICATE = "duplicate"  # every sample was already held
    OTHER_MODEL = "other_model"
    REJECTED = "rejected"
    ALREADY_HELD = "already_held"  # this offset was read before


@dataclass(slots=True)
class CacheStats:
    records: int = 0
    samples_added: int = 0
    duplicate_samples: int = 0
    other_models: int = 0
    already_held: int = 0
    rejected: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def rejected_records(self) -> int:
        return sum(self.rejected.values())


class FeatureCache:
    """Decoded samples of one model, grown record by record from the feature log.

    Storage is a set of columns with capacity doubling: features in the pushes' dtype
    (float16 unless a float32 push arrives, which widens the column once), labels, the
    ``(partition, offset)`` of the push each sample came from, and its key. Which offsets
    have been read is kept separately (:class:`OffsetSet`) so records that carried nothing
    for this model are not read again either.
    """

    def __init__(
        self,
        model_id: str,
        *,
        backbone: Backbone | str,
        cut: Cut | str,
        num_classes: int | None = None,
        max_push_samples: int = codec.DEFAULT_MAX_SAMPLES,
    ) -> None:
        self.model_id = model_id
        self.backbone = Backbone(backbone)
        self.cut = Cut(cut)
        self.num_classes = num_classes
        self.max_push_samples = max_push_samples
        self.feature_shape = FEATURE_SHAPES[self.backbone][self.cut]
        self.held = OffsetSet()
        self.stats = CacheStats()
        self.fit = ModelFit(model_id, self.backbone, self.cut, num_classes, max_push_samples)
        self._n = 0
        self._features: npt.NDArray[np.floating] = np.empty((0, *self.feature_shape), np.float16)
        self._labels = np.empty(0, np.int64)
        self._sample_ids = np.empty(0, np.uint64)
        self._partitions = np.empty(0, np.int32)
        self._offsets = np.empty(0, np.int64)
        self._device_ids: list[str] = []
        #: Per row, the index of its device in ``_devices`` (for stratified replay).
        self._device_codes = np.empty(0, np.int64)
        self._devices: dict[str, int] = {}
        self._rows: dict[tuple[str, int], int] = {}
        #: Validation side of rows ``[0, len(_val))`` under ``_val_rule`` (hashed once).
        self._val_rule: ValidationRule | None = None
        self._val = np.empty(0, np.bool_)

    def __len__(self) -> int:
        return self._n

    @property
    def nbytes(self) -> int:
        return int(self._features[: self._n].nbytes)

    # ----------------------------------------------------------------- reading

    def missing(self, ranges: Iterable[OffsetRange]) -> list[OffsetRange]:
        """The parts of ``ranges`` this cache has not read yet."""
        return [gap for wanted in ranges for gap in self.held.missing(wanted)]

    def mark_read(self, read: OffsetRange) -> None:
        """Record that every offset of ``read`` has been consumed (offsets without a record
        — transaction markers, retention gaps — included)."""
        self.held.add(read.partition, read.start, read.end)

    def add_record(
        self, partition: int, offset: int, key: bytes | None, value: bytes | None
    ) -> AddResult:
        """Take one feature-log record: decode it if it is this model's, keep its new
        samples. Never raises on bad input (it is counted under ``stats.rejected``)."""
        if self.held.contains(partition, offset):
            self.stats.already_held += 1
            return AddResult.ALREADY_HELD
        self.held.add(partition, offset, offset + 1)
        self.stats.records += 1
        accepted = accept_push(key, value, self.fit)
        if accepted == OTHER_MODEL:
            self.stats.other_models += 1
            return AddResult.OTHER_MODEL
        if isinstance(accepted, str):
            self.stats.rejected[accepted] += 1
            return AddResult.REJECTED
        push = accepted
        added = self.add_push(push, partition, offset)
        return AddResult.ADDED if added else AddResult.DUPLICATE

    def add_push(self, push: FeaturePush, partition: int, offset: int) -> int:
        """Keep the samples of a decoded push found at ``(partition, offset)``; returns how
        many were new. A sample already held from a later position is replaced by this
        copy (lowest position wins)."""
        if push.feature_shape != self.feature_shape:
            raise ValueError(f"push features {push.feature_shape} do not fit {self.feature_shape}")
        if push.features.dtype.itemsize > self._features.dtype.itemsize:
            self._features = self._features.astype(push.features.dtype)
        sample_ids = push.sample_ids.tolist()
        fresh: list[int] = []
        position = (partition, offset)
        for i, sample_id in enumerate(sample_ids):
            key = (push.device_id, sample_id)
            row = self._rows.get(key)
            if row is None:
                self._rows[key] = self._n + len(fresh)
                fresh.append(i)
                continue
            self.stats.duplicate_samples += 1
            if row >= self._n:  # repeated within this push (decoded pushes never do)
                continue
            held_at = (int(self._partitions[row]), int(self._offsets[row]))
            if position < held_at:  # read out of order: the earlier copy is the sample
                self._features[row] = push.features[i]
                self._labels[row] = push.labels[i]
                self._partitions[row], self._offsets[row] = position
        if fresh:
            self._append(push, np.asarray(fresh, dtype=np.intp), partition, offset)
        self.stats.samples_added += len(fresh)
        return len(fresh)

    def _append(
        self, push: FeaturePush, index: npt.NDArray[np.intp], partition: int, offset: int
    ) -> None:
        k = len(index)
        self._reserve(self._n + k)
        at, end = self._n, self._n + k
        whole = k == push.n
        self._features[at:end] = push.features if whole else push.features[index]
        self._labels[at:end] = push.labels if whole else push.labels[index]
        self._sample_ids[at:end] = push.sample_ids if whole else push.sample_ids[index]
        self._partitions[at:end] = partition
        self._offsets[at:end] = offset
        self._device_ids.extend([push.device_id] * k)
        self._device_codes[at:end] = self._devices.setdefault(push.device_id, len(self._devices))
        self._n = end

    def _reserve(self, size: int) -> None:
        capacity = self._labels.shape[0]
        if size <= capacity:
            return
        new = max(size, 2 * capacity, 1024)

        def grow(column: npt.NDArray[np.generic]) -> npt.NDArray[np.generic]:
            out = np.empty((new, *column.shape[1:]), dtype=column.dtype)
            out[: self._n] = column[: self._n]
            return out

        self._features = grow(self._features)  # type: ignore[assignment]
        self._labels = grow(self._labels)  # type: ignore[assignment]
        self._sample_ids = grow(self._sample_ids)  # type: ignore[assignment]
        self._partitions = grow(self._partitions)  # type: ignore[assignment]
        self._offsets = grow(self._offsets)  # type: ignore[assignment]
        self._device_codes = grow(self._device_codes)  # type: ignore[assignment]

    # ----------------------------------------------------------------- selecting

    def _in_ranges(
        self,
        partitions: npt.NDArray[np.integer],
        offsets: npt.NDArray[np.integer],
        ranges: Sequence[OffsetRange],
    ) -> npt.NDArray[np.bool_]:
        mask = np.zeros(partitions.shape[0], dtype=np.bool_)
        for r in ranges:
            mask |= (partitions == r.partition) & (offsets >= r.start) & (offsets < r.end)
        return mask

    def select(self, ranges: Sequence[OffsetRange] | None = None) -> Dataset:
        """The samples whose first occurrence is inside ``ranges`` (every sample when None),
        in row order. Views, not copies, when that is every sample held. Exact only if the
        cache holds the ranges' partitions from the log's start (an earlier copy it did not
        read would otherwise go unseen)."""
        n = self._n
        if ranges is None:
            rows = np.arange(n)
        else:
            mask = self._in_ranges(self._partitions[:n], self._offsets[:n], ranges)
            rows = np.flatnonzero(mask)
        if rows.shape[0] == n:
            return Dataset(
                features=self._features[:n],
                labels=self._labels[:n],
                device_ids=tuple(self._device_ids),
                sample_ids=self._sample_ids[:n],
            )
        return self.take(rows)

    def window(
        self, ranges: Sequence[OffsetRange]
    ) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.bool_]]:
        """A job's window: the rows held in the partitions of ``ranges`` below each one's
        end, in log order (partition, offset, sample id), and which of them are the job's
        new samples (first copy inside ``ranges``). Exact, like :meth:`select`, when the
        cache holds those partitions from the log's start."""
        n = self._n
        partitions, offsets = self._partitions[:n], self._offsets[:n]
        ends: dict[int, int] = {}
        for r in ranges:
            ends[r.partition] = max(r.end, ends.get(r.partition, r.end))
        inside = np.zeros(n, dtype=np.bool_)
        for partition, end in ends.items():
            inside |= (partitions == partition) & (offsets < end)
        rows = np.flatnonzero(inside)
        order = np.lexsort((self._sample_ids[rows], offsets[rows], partitions[rows]))
        rows = rows[order]
        return rows, self._in_ranges(partitions[rows], offsets[rows], ranges)

    def validation(self, rule: ValidationRule) -> npt.NDArray[np.bool_]:
        """Per row held, whether ``rule`` makes it a validation sample of this model. Rows
        keep their key, so each is hashed once (again only when the rule changes)."""
        if rule != self._val_rule:
            self._val_rule, self._val = rule, np.empty(0, np.bool_)
        done = self._val.shape[0]
        if done < self._n:
            keys = list(
                zip(
                    self._device_ids[done : self._n],
                    self._sample_ids[done : self._n].tolist(),
                    strict=True,
                )
            )
            self._val = np.concatenate([self._val, rule.mask(self.model_id, keys)])
        return self._val[: self._n]

    def labels_of(self, rows: npt.NDArray[np.intp]) -> npt.NDArray[np.int64]:
        return self._labels[rows]

    def devices_of(self, rows: npt.NDArray[np.intp]) -> npt.NDArray[np.int64]:
        """Per row, an integer standing for its device (stable within this cache)."""
        return self._device_codes[rows]

    def take(self, rows: npt.NDArray[np.intp]) -> Dataset:
        """The samples at ``rows`` (copies), in that order."""
        return Dataset(
            features=self._features[rows],
            labels=self._labels[rows],
            device_ids=tuple(self._device_ids[i] for i in rows.tolist()),
            sample_ids=self._sample_ids[rows],
        )

    # ----------------------------------------------------------------- retention

    def forget_before(self, low_water: Mapping[int, int]) -> int:
        """Drop samples (and read marks) below each partition's ``low_water`` offset: the
        log no longer holds them, so no trigger can name them. Returns samples dropped."""
        n = self._n
        drop = np.zeros(n, dtype=np.bool_)
        for partition, offset in low_water.items():
            drop |= (self._partitions[:n] == partition) & (self._offsets[:n] < offset)
            self.held.forget_before(partition, offset)
        dropped = int(drop.sum())
        if not dropped:
            return 0
        keep = np.flatnonzero(~drop)
        self._features = self._features[keep]
        self._labels = self._labels[keep]
        self._sample_ids = self._sample_ids[keep]
        self._partitions = self._partitions[keep]
        self._offsets = self._offsets[keep]
        self._device_codes = self._device_codes[keep]
        self._val = self._val[keep[keep < self._val.shape[0]]]
        self._device_ids = [self._device_ids[i] for i in keep.tolist()]
        self._n = int(keep.shape[0])
        self._rows = {(self._device_ids[i], int(self._sample_ids[i])): i for i in range(self._n)}
        return dropped


def offset_ranges(positions: Iterable[tuple[int, int]]) -> list[OffsetRange]:
    """The smallest ``[min, max + 1)`` range per partition covering ``(partition, offset)``
    positions (e.g. a producer's send results), by partition."""
    lows: dict[int, int] = {}
    highs: dict[int, int] = {}
    for partition, offset in positions:
        lows[partition] = min(offset, lows.get(partition, offset))
        highs[partition] = max(offset + 1, highs.get(partition, 0))
    return [OffsetRange(p, lows[p], highs[p]) for p in sorted(lows)]
