"""Counters, mergeable percentiles, freshness and per-version accounting."""

from __future__ import annotations

import math

import numpy as np
import pytest

from device_sim.accounting import (
    DeviceCounters,
    FreshnessLog,
    LogHistogram,
    VersionLedger,
    distribution,
    merge_versions,
)


def test_counters_add_repeated_devices() -> None:
    c = DeviceCounters(4)
    c.add("pushes", [0, 0, 3])
    c.add("bytes_up", [1, 1], [10, 5])
    assert c["pushes"].tolist() == [2, 0, 0, 1]
    assert c.totals()["bytes_up"] == 15


def test_histogram_percentiles_are_within_a_bin_and_merge_exactly() -> None:
    rng = np.random.default_rng(0)
    values = rng.lognormal(3.0, 1.0, 20_000)
    h = LogHistogram()
    h.add(values[:10_000])
    other = LogHistogram()
    other.add(values[10_000:])
    h.merge(other)
    assert h.n == 20_000
    step = 10 ** (1 / h.per_decade)
    for q in (0.5, 0.99):
        exact = float(np.quantile(values, q))
        assert exact <= h.percentile(q) <= exact * step * 1.001
    assert h.summary()["max"] == pytest.approx(values.max())
    again = LogHistogram.from_dict(h.to_dict())
    assert again.percentile(0.99) == h.percentile(0.99)
    assert math.isnan(LogHistogram().percentile(0.5))


def test_freshness_waits_for_the_covering_version_on_the_pushing_device() -> None:
    log = FreshnessLog()
    log.record([0, 1, 2], [0, 0, 1], [5, 6, 7], [100.0, 200.0, 300.0])
    model = np.array([True, True, False])
    assert log.cover([(0, 5, 7)], version=3, devices_of_model=model, is_best=True) == 2
    active = np.array([3, -1, -1])
    at = np.array([1000.0, 0.0, 0.0])
    assert log.resolve(active, at) == 1  # device 1 has not activated version 3 yet
    assert log.freshness_s.n == 1 and log.freshness_s.max == pytest.approx(900.0)
    active = np.array([3, 4, -1])  # a later version includes what version 3 did
    at = np.array([1000.0, 1200.0, 0.0])
    assert log.resolve(active, at) == 1
    assert log.pending == 1  # device 2's push: no version covers it yet


def test_version_ledger_and_merge() -> None:
    ledger = VersionLedger()
    v = ledger.add(
        "m", "v1", is_best=True, size_bytes=10, devices=3, mean_accuracy=0.6, received_sim_s=0
    )
    v.apply(np.array([0.4, np.nan], np.float32), np.array([0.6, 0.8], np.float32), 0.05)
    d = v.as_dict()
    assert d["accuracy_before"] == pytest.approx(0.4) and d["accuracy_after"] == pytest.approx(0.7)
    other = dict(d, devices=1, mean_accuracy=1.0, applied=1)
    merged = merge_versions([[d], [other]])
    assert len(merged) == 1
    assert merged[0]["devices"] == 4 and merged[0]["applied"] == 3
    assert merged[0]["mean_accuracy"] == pytest.approx((0.6 * 3 + 1.0) / 4)
    assert ledger.get("m", "v1") is v and len(ledger) == 1
    assert distribution([1.0, 2.0, np.nan])["mean"] == pytest.approx(1.5)
