"""What a fleet counts, per device and in total, and the summaries it reports.

Pure bookkeeping, no I/O: :class:`DeviceCounters` (one int64 array per counter, indexed by
device), :class:`LogHistogram` (mergeable latency percentiles, so the summaries of several
worker processes combine exactly), :class:`FreshnessLog` (acknowledged pushes waiting for
the model that includes them to be active on their device) and :class:`VersionLedger`
(per model version: devices that applied it, their accuracy before and after, fan-out
time). :func:`merge_summaries` combines the JSON summaries of fleet shards.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

#: Every per-device counter, in report order.
COUNTERS = (
    "backlog",
    "inferences",
    "feedback",
    "confirmed",
    "corrected",
    "wrong_labels",
    "evicted",
    "push_attempts",
    "pushes",
    "retries",
    "samples_pushed",
    "bytes_up",
    "bytes_down",
    "downloads",
    "versions_applied",
)


class DeviceCounters:
    """One int64 array per name in :data:`COUNTERS`, each of length ``n``."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.arrays: dict[str, npt.NDArray[np.int64]] = {
            name: np.zeros(n, dtype=np.int64) for name in COUNTERS
        }

    def __getitem__(self, name: str) -> npt.NDArray[np.int64]:
        return self.arrays[name]

    def add(self, name: str, devices: npt.ArrayLike, amount: npt.ArrayLike = 1) -> None:
        """``counter[devices] += amount``; repeated devices add up."""
        np.add.at(self.arrays[name], np.asarray(devices, dtype=np.int64), amount)

    def totals(self) -> dict[str, int]:
        return {name: int(a.sum()) for name, a in self.arrays.items()}


# --------------------------------------------------------------------------- histograms


@dataclass
class LogHistogram:
    """Counts of non-negative values in log-spaced bins (``per_decade`` bins per factor of
    ten from ``low`` to ``high``; below ``low`` falls in bin 0, above ``high`` in the last).
    Percentiles are exact to one bin (12 % with 20 bins a decade); histograms of equal
    shape merge by adding counts."""

    low: float = 1e-3
    high: float = 1e7
    per_decade: int = 20
    counts: npt.NDArray[np.int64] = field(init=False)
    total: float = 0.0
    max: float = 0.0

    def __post_init__(self) -> None:
        bins = round(math.log10(self.high / self.low) * self.per_decade) + 2
        self.counts = np.zeros(bins, dtype=np.int64)

    @property
    def n(self) -> int:
        return int(self.counts.sum())

    def add(self, values: npt.ArrayLike) -> None:
        v = np.asarray(values, dtype=np.float64).ravel()
        v = v[np.isfinite(v)]
        if v.size == 0:
            return
        v = np.maximum(v, 0.0)
        index = np.floor(np.log10(np.maximum(v, self.low * 0.1) / self.low) * self.per_decade) + 1
        index = np.clip(index, 0, self.counts.size - 1).astype(np.int64)
        np.add.at(self.counts, index, 1)
        self.total += float(v.sum())
        self.max = max(self.max, float(v.max()))

    def _upper(self, index: int) -> float:
        if index == 0:
            return self.low
        return float(min(self.low * 10 ** (index / self.per_decade), self.max))

    def percentile(self, q: float) -> float:
        """Upper edge of the bin holding the ``q``-quantile (0 < q ≤ 1); NaN when empty."""
        n = self.n
        if n == 0:
            return math.nan
        rank = max(1, math.ceil(q * n))
        index = int(np.searchsorted(np.cumsum(self.counts), rank))
        return self._upper(index)

    def summary(self) -> dict[str, float | int]:
        n = self.n
        return {
            "n": n,
            "mean": self.total / n if n else math.nan,
            "p50": self.percentile(0.5),
            "p99": self.percentile(0.99),
            "max": self.max if n else math.nan,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "low": self.low,
            "high": self.high,
            "per_decade": self.per_decade,
            "counts": self.counts.tolist(),
            "total": self.total,
            "max": self.max,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LogHistogram:
        h = cls(float(data["low"]), float(data["high"]), int(data["per_decade"]))
        h.counts = np.asarray(data["counts"], dtype=np.int64)
        h.total, h.max = float(data["total"]), float(data["max"])
        return h

    def merge(self, other: LogHistogram) -> None:
        if other.counts.shape != self.counts.shape or other.low != self.low:
            raise ValueError("histograms of different shapes do not merge")
        self.counts += other.counts
        self.total += other.total
        self.max = max(self.max, other.max)


# --------------------------------------------------------------------------- freshness


class FreshnessLog:
    """Acknowledged pushes, each with the time of its oldest feedback, until the model
    version trained on it is active on the device that pushed it.

    Freshness of a push = activation time of the first version on its device that covers
    it (the version's trigger ranges hold the push's feature-log offset, or a later best
    version of the same model) minus the time its oldest sample got its label. Times are simulated
    seconds. A push covered by a version that lost champion/challenger validation is
    *excluded*: no active model will include it.
    """

    def __init__(self) -> None:
        self._cols: dict[str, list[npt.NDArray[Any]]] = {
            k: [] for k in ("device", "partition", "offset", "oldest", "covered")
        }
        self._merged: dict[str, npt.NDArray[Any]] | None = None
        self.freshness_s = LogHistogram()
        self.excluded = 0

    def _table(self) -> dict[str, npt.NDArray[Any]]:
        if self._merged is None or any(self._cols[k] for k in self._cols):
            base = self._merged or {
                "device": np.zeros(0, np.int64),
                "partition": np.zeros(0, np.int64),
                "offset": np.zeros(0, np.int64),
                "oldest": np.zeros(0, np.float64),
                "covered": np.zeros(0, np.int64),
            }
            self._merged = {k: np.concatenate([base[k], *self._cols[k]]) for k in self._cols}
            for k in self._cols:
                self._cols[k] = []
        return self._merged

    def record(
        self,
        devices: npt.ArrayLike,
        partitions: npt.ArrayLike,
        offsets: npt.ArrayLike,
        oldest_s: npt.ArrayLike,
    ) -> None:
        d = np.asarray(devices, dtype=np.int64)
        self._cols["device"].append(d)
        self._cols["partition"].append(np.asarray(partitions, dtype=np.int64))
        self._cols["offset"].append(np.asarray(offsets, dtype=np.int64))
        self._cols["oldest"].append(np.asarray(oldest_s, dtype=np.float64))
        self._cols["covered"].append(np.full(d.shape, -1, dtype=np.int64))

    @property
    def pending(self) -> int:
        return int(self._table()["device"].shape[0])

    def cover(
        self,
        ranges: Iterable[tuple[int, int, int]],
        version: int,
        devices_of_model: npt.NDArray[np.bool_],
        *,
        is_best: bool,
    ) -> int:
        """Mark pushes in ``ranges`` ((partition, start, end) half-open) of this model's
        devices as covered by ``version`` (an increasing index); returns how many."""
        t = self._table()
        mine = devices_of_model[t["device"]] & (t["covered"] < 0)
        hit = np.zeros_like(mine)
        for partition, start, end in ranges:
            hit |= (
                mine & (t["partition"] == partition) & (t["offset"] >= start) & (t["offset"] < end)
            )
        count = int(hit.sum())
        if not is_best:
            self.excluded += count
            self._keep(~hit)
        else:
            t["covered"][hit] = version
        return count

    def resolve(self, active_version: npt.NDArray[np.int64], at_s: npt.ArrayLike) -> int:
        """Pushes whose device now runs a version ≥ the covering one leave the log with
        freshness ``at_s[device] - oldest``; returns how many."""
        t = self._table()
        if t["device"].size == 0:
            return 0
        covered = t["covered"]
        done = (covered >= 0) & (active_version[t["device"]] >= covered)
        if done.any():
            at = np.asarray(at_s, dtype=np.float64)
            self.freshness_s.add(at[t["device"][done]] - t["oldest"][done])
            self._keep(~done)
        return int(done.sum())

    def _keep(self, mask: npt.NDArray[np.bool_]) -> None:
        t = self._table()
        self._merged = {k: v[mask] for k, v in t.items()}


# --------------------------------------------------------------------------- versions


@dataclass
class VersionRecord:
    """One model version as this fleet saw it."""

    model_id: str
    version: str
    is_best: bool
    index: int
    size_bytes: int
    devices: int
    mean_accuracy: float
    received_sim_s: float
    produced_at: float = math.nan
    applied: int = 0
    before_sum: float = 0.0
    before_n: int = 0
    after_sum: float = 0.0
    after_n: int = 0
    fanout_wall_s: LogHistogram = field(default_factory=lambda: LogHistogram(low=1e-4))

    def apply(
        self, before: npt.NDArray[np.float32], after: npt.NDArray[np.float32], wall_s: float
    ) -> None:
        self.applied += int(after.shape[0])
        fb, fa = before[np.isfinite(before)], after[np.isfinite(after)]
        self.before_sum += float(fb.sum())
        self.before_n += int(fb.size)
        self.after_sum += float(fa.sum())
        self.after_n += int(fa.size)
        self.fanout_wall_s.add(np.full(after.shape[0], wall_s))

    def as_dict(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "version": self.version,
            "is_best": self.is_best,
            "size_bytes": self.size_bytes,
            "devices": self.devices,
            "applied": self.applied,
            "mean_accuracy": self.mean_accuracy,
            "accuracy_before": self.before_sum / self.before_n if self.before_n else math.nan,
            "accuracy_after": self.after_sum / self.after_n if self.after_n else math.nan,
            "before_sum": self.before_sum,
            "before_n": self.before_n,
            "after_sum": self.after_sum,
            "after_n": self.after_n,
            "received_sim_s": self.received_sim_s,
            "produced_at": self.produced_at,
            "fanout_wall_s": self.fanout_wall_s.to_dict(),
        }


class VersionLedger:
    """Every version the fleet received, in arrival order (index = arrival position)."""

    def __init__(self) -> None:
        self.records: list[VersionRecord] = []
        self._index: dict[tuple[str, str], int] = {}

    def get(self, model_id: str, version: str) -> VersionRecord | None:
        i = self._index.get((model_id, version))
        return self.records[i] if i is not None else None

    def add(
        self,
        model_id: str,
        version: str,
        *,
        is_best: bool,
        size_bytes: int,
        devices: int,
        mean_accuracy: float,
        received_sim_s: float,
        produced_at: float = math.nan,
    ) -> VersionRecord:
        record = VersionRecord(
            model_id,
            version,
            is_best,
            len(self.records),
            size_bytes,
            devices,
            mean_accuracy,
            received_sim_s,
            produced_at,
        )
        self._index[(model_id, version)] = record.index
        self.records.append(record)
        return record

    def __len__(self) -> int:
        return len(self.records)


# --------------------------------------------------------------------------- summaries


def distribution(values: npt.ArrayLike) -> dict[str, float]:
    """mean / p50 / p99 / max of a per-device column (NaN-free)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"mean": math.nan, "p50": math.nan, "p99": math.nan, "max": math.nan}
    return {
        "mean": float(v.mean()),
        "p50": float(np.percentile(v, 50)),
        "p99": float(np.percentile(v, 99)),
        "max": float(v.max()),
    }


def merge_versions(shards: Sequence[Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Per-version records of several shards, combined by (model, version)."""
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for versions in shards:
        for v in versions:
            key = (str(v["model_id"]), str(v["version"]))
            if key not in merged:
                merged[key] = dict(v)
                merged[key]["fanout_wall_s"] = LogHistogram.from_dict(v["fanout_wall_s"])
                continue
            m = merged[key]
            total = m["devices"] + v["devices"]
            if total:  # weighted by devices; a NaN side (no held-out rows) counts as absent
                pairs = [(m["mean_accuracy"], m["devices"]), (v["mean_accuracy"], v["devices"])]
                finite = [(a, n) for a, n in pairs if a is not None and math.isfinite(a)]
                weight = sum(n for _, n in finite)
                m["mean_accuracy"] = sum(a * n for a, n in finite) / weight if weight else math.nan
            for name in ("devices", "applied", "before_sum", "before_n", "after_sum", "after_n"):
                m[name] += v[name]
            m["fanout_wall_s"].merge(LogHistogram.from_dict(v["fanout_wall_s"]))
            if m["mean_accuracy"] is None:
                m["mean_accuracy"] = math.nan
    out = []
    for m in merged.values():
        m["accuracy_before"] = m["before_sum"] / m["before_n"] if m["before_n"] else math.nan
        m["accuracy_after"] = m["after_sum"] / m["after_n"] if m["after_n"] else math.nan
        m["fanout_wall_s"] = m["fanout_wall_s"].to_dict()
        out.append(m)
    return out
