"""The device model without a broker: feedback, label noise, cache eviction, the push
policy's daily rhythm, backoff, and samples leaving the cache only when acknowledged."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from device_sim.devices import (
    DAY,
    HOUR,
    Availability,
    DeviceFleet,
    DeviceParams,
    PushState,
    backoff_seconds,
    compute_tier_of_vendor,
)
from pipeline.errors import ConfigError

CLASSES = 10


def draw_rows(
    model: int, devices: np.ndarray, identities: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """A fake bank: the row encodes (model, identity) so tests can check labels."""
    return (model * 100 + identities).astype(np.int64)


def make_fleet(n: int = 200, seed: int = 0, **params: object) -> DeviceFleet:
    defaults: dict[str, object] = {"availability": Availability.ALWAYS, "initial_backlog": False}
    defaults.update(params)
    p = DeviceParams(**defaults)  # type: ignore[arg-type]
    rng = np.random.default_rng(seed)
    return DeviceFleet(
        model_ids=("m0", "m1"),
        model_of=np.arange(n) % 2,
        vendor=rng.integers(1, 5, n),
        identities=[rng.choice(CLASSES, size=3, replace=False) for _ in range(n)],
        num_classes=CLASSES,
        vendors=4,
        global_index=np.arange(n),
        params=p,
        seed=seed,
    )


def run_inference(fleet: DeviceFleet, hours: float, seed: int = 1, step_h: float = 0.25) -> None:
    rng = np.random.default_rng(seed)
    now = 0.0
    while now < hours * HOUR:
        now += step_h * HOUR
        fleet.infer(now, step_h * HOUR, draw_rows, rng)


def test_feedback_follows_accuracy_and_rates() -> None:
    fleet = make_fleet(
        n=400,
        inferences_per_hour=20.0,
        confirm_rate=0.4,
        correct_rate=0.8,
        wrong_label_fraction=0.0,
        cache_capacity=4096,
        push_batch=10,
        push_max=64,
    )
    fleet.accuracy[:] = 0.75
    run_inference(fleet, hours=10)
    c = fleet.counters.totals()
    assert c["inferences"] > 50_000
    # Right predictions (75 %) are confirmed at 0.4, wrong ones corrected at 0.8.
    assert c["confirmed"] / c["inferences"] == pytest.approx(0.75 * 0.4, abs=0.01)
    assert c["corrected"] / c["inferences"] == pytest.approx(0.25 * 0.8, abs=0.01)
    assert c["feedback"] == c["confirmed"] + c["corrected"]
    assert c["wrong_labels"] == 0 and c["evicted"] == 0
    assert int(fleet.cached.sum()) == c["feedback"]


def test_wrong_label_fraction_and_labels_are_the_devices_identities() -> None:
    fleet = make_fleet(
        n=300, inferences_per_hour=30.0, wrong_label_fraction=0.2, cache_capacity=4096
    )
    run_inference(fleet, hours=5)
    wrong = right = 0
    for k in range(fleet.n):
        n = fleet.cache_count[k]
        ring = (fleet.cache_head[k] + np.arange(n)) % fleet.params.cache_capacity
        truth = fleet.cache_rows[k, ring] % 100  # the fake bank's row holds the identity
        labels = fleet.cache_labels[k, ring]
        mine = fleet.identity_table[k, : fleet.identity_count[k]]
        assert np.isin(truth, mine).all()
        assert ((labels >= 0) & (labels < CLASSES)).all()
        wrong += int((labels != truth).sum())
        right += int((labels == truth).sum())
    assert wrong == fleet.counters.totals()["wrong_labels"]
    assert wrong / (wrong + right) == pytest.approx(0.2, abs=0.015)


def test_cache_evicts_the_oldest_and_counts_it() -> None:
    fleet = make_fleet(n=50, inferences_per_hour=60.0, cache_capacity=16, push_batch=4)
    fleet.accuracy[:] = 0.0  # every prediction wrong: corrected at 0.7
    run_inference(fleet, hours=4)
    c = fleet.counters.totals()
    assert (fleet.cache_count == 16).all()
    assert c["evicted"] == c["feedback"] - 16 * fleet.n
    for k in range(fleet.n):
        ids = fleet.cached_ids(k)
        # The ring holds the newest 16 samples, oldest first, ids strictly increasing.
        assert np.all(np.diff(ids.astype(np.int64)) > 0)
        assert int(ids[-1]) == int(fleet.next_sample_id[k]) - 1


def test_sample_ids_are_unique_per_device_across_evictions_and_pushes() -> None:
    fleet = make_fleet(n=20, inferences_per_hour=60.0, cache_capacity=8, push_batch=4, push_max=4)
    rng = np.random.default_rng(5)
    seen: list[set[int]] = [set() for _ in range(fleet.n)]
    now = 0.0
    for _ in range(40):
        now += 600
        fleet.infer(now, 600, draw_rows, rng)
        due = fleet.due(now)
        fleet.begin(due)
        for k in due:
            _, _, ids, _ = fleet.pushed(int(k))
            assert not seen[k] & set(ids.tolist())
            seen[k] |= set(ids.tolist())
        fleet.sent(due, np.full(due.size, 1000), now)
        fleet.acked(due, np.zeros(due.size, np.int64), np.arange(due.size))
        fleet.settle(now + 3600)
    assert sum(len(s) for s in seen) == fleet.counters.totals()["samples_pushed"]


def test_only_an_acknowledged_push_leaves_the_cache_and_retries_resend_the_same_samples() -> None:
    fleet = make_fleet(n=10, inferences_per_hour=100.0, cache_capacity=32, push_batch=5)
    rng = np.random.default_rng(2)
    fleet.infer(HOUR, HOUR, draw_rows, rng)
    before = [fleet.cached_ids(k).copy() for k in range(fleet.n)]
    due = fleet.due(HOUR)
    assert due.size == fleet.n
    fleet.begin(due)
    pinned = [fleet.pushed(k)[2].copy() for k in range(fleet.n)]
    for k in range(fleet.n):
        # Oldest first, and still held: pinned samples are part of the cache.
        assert np.array_equal(pinned[k], before[k][: pinned[k].size])
        assert np.array_equal(np.sort(fleet.cached_ids(k)), np.sort(before[k]))
    fleet.sent(due, np.full(due.size, 5000), HOUR)
    fleet.failed(due, HOUR, rng)
    assert (fleet.push_state == PushState.BACKOFF).all()
    assert fleet.due(HOUR).size == 0  # backing off
    assert int(fleet.cached.sum()) == sum(b.size for b in before)
    later = HOUR + 10 * HOUR
    again = fleet.due(later)
    assert again.size == fleet.n
    fleet.begin(again)
    for k in range(fleet.n):
        assert np.array_equal(fleet.pushed(k)[2], pinned[k])  # same ids on retry
    assert (fleet.push_attempt == 2).all()
    fleet.sent(again, np.full(again.size, 5000), later)
    # Acked but the simulated transfer has not finished: still cached.
    fleet.acked(again, np.zeros(again.size, np.int64), np.arange(again.size))
    assert fleet.settle(later - 1).devices.size == 0
    settled = fleet.settle(later + 3600)
    assert settled.devices.size == fleet.n
    for k in range(fleet.n):
        assert not np.isin(pinned[k], fleet.cached_ids(k)).any()
    totals = fleet.counters.totals()
    assert totals["retries"] == fleet.n and totals["push_attempts"] == 2 * fleet.n
    assert totals["pushes"] == fleet.n
    assert totals["samples_pushed"] == sum(p.size for p in pinned)
    assert totals["bytes_up"] == 2 * 5000 * fleet.n  # failed attempts sent bytes too


def test_pinned_samples_are_never_evicted() -> None:
    fleet = make_fleet(n=5, inferences_per_hour=200.0, cache_capacity=10, push_batch=10)
    fleet.accuracy[:] = 0.0
    rng = np.random.default_rng(3)
    now = 0.0
    while (fleet.cache_count < 10).any():
        now += 600
        fleet.infer(now, 600, draw_rows, rng)
    fleet.begin(fleet.due(now))
    pinned = [fleet.pushed(k)[2].copy() for k in range(fleet.n)]
    fleet.infer(now + HOUR, HOUR, draw_rows, rng)  # the cache is full of pinned samples
    for k in range(fleet.n):
        assert np.array_equal(fleet.pushed(k)[2], pinned[k])
        assert fleet.cached[k] <= 10


def test_push_policy_follows_the_daily_rhythm() -> None:
    fleet = make_fleet(n=2000, availability=Availability.RHYTHM, timezone_spread_h=0.0)
    hours = np.arange(0, 24, 0.5)
    online = np.array([fleet.available(h * HOUR).mean() for h in hours])
    # No time zones: everyone's night window starts between 21:00 and 24:00.
    assert online[hours == 14.0][0] < 0.3
    assert online[(hours >= 1) & (hours <= 3)].min() > 0.8
    assert fleet.available(3 * HOUR).mean() == pytest.approx(fleet.available(DAY + 3 * HOUR).mean())
    # A device inside its window is not in use (no inference there).
    assert not (fleet.available(2 * HOUR) & fleet.in_use(2 * HOUR)).any()
    # Offline devices never push, whatever they hold.
    rng = np.random.default_rng(0)
    fleet.infer(12 * HOUR, 12 * HOUR, draw_rows, rng)
    due = fleet.due(14 * HOUR)
    assert fleet.available(14 * HOUR)[due].all()
    assert (fleet.cache_count[due] >= fleet.params.push_batch).all()


def test_backoff_grows_and_is_capped() -> None:
    rng = np.random.default_rng(0)
    attempts = np.repeat(np.arange(1, 12), 2000)
    waits = backoff_seconds(attempts, base=10.0, cap=300.0, rng=rng)
    assert waits.min() >= 1.0
    means = [waits[attempts == a].mean() for a in range(1, 12)]
    assert means[0] == pytest.approx(5.0, rel=0.1)
    assert means[3] == pytest.approx(40.0, rel=0.1)
    assert waits.max() <= 300.0 and means[-1] == pytest.approx(150.0, rel=0.1)


def test_versions_activate_after_download_and_track_accuracy() -> None:
    fleet = make_fleet(n=100, simulate_transfer=True)
    devices = fleet.devices_of(0)
    acc = np.linspace(0.2, 0.9, devices.size, dtype=np.float32)
    fleet.offer(0, 0, acc, size_bytes=1_000_000, now=10.0)
    ready, versions, before = fleet.activate(10.0)
    assert ready.size == 0  # a megabyte takes time on every tier
    ready, versions, before = fleet.activate(10.0 + 3600)
    assert np.array_equal(ready, devices) and (versions == 0).all()
    assert np.isnan(before).all()
    assert np.allclose(fleet.accuracy[devices], acc)
    assert np.isnan(fleet.accuracy[fleet.devices_of(1)]).all()
    totals = fleet.counters.totals()
    assert totals["bytes_down"] == 1_000_000 * devices.size
    assert totals["versions_applied"] == devices.size


def test_freshness_resolves_when_the_covering_version_is_active() -> None:
    fleet = make_fleet(n=4, inferences_per_hour=100.0, push_batch=5, simulate_transfer=False)
    rng = np.random.default_rng(0)
    fleet.infer(HOUR, HOUR, draw_rows, rng)
    due = fleet.due(HOUR)
    fleet.begin(due)
    oldest = fleet.push_ts[due, 0].copy()
    fleet.sent(due, np.full(due.size, 100), HOUR)
    fleet.acked(due, np.zeros(due.size, np.int64), np.arange(10, 10 + due.size))
    fleet.settle(HOUR)
    model0 = fleet.model_of == 0
    assert fleet.freshness.cover([(0, 10, 10 + due.size)], 0, model0, is_best=True) == 2
    fleet.offer(0, 0, np.full(2, 0.5), 100, now=2 * HOUR)
    fleet.activate(2 * HOUR)
    h = fleet.freshness.freshness_s
    assert h.n == 2
    expect = 2 * HOUR - oldest[fleet.model_of[due] == 0]
    assert h.max == pytest.approx(expect.max())
    assert fleet.freshness.pending == 2  # model 1's pushes wait for their version
    assert fleet.freshness.cover([(0, 0, 100)], 1, ~model0, is_best=False) == 2
    assert fleet.freshness.excluded == 2 and fleet.freshness.pending == 0


def test_device_params_and_tiers_are_validated() -> None:
    with pytest.raises(ConfigError):
        DeviceParams(push_batch=100, cache_capacity=64)
    with pytest.raises(ConfigError):
        DeviceParams(confirm_rate=1.5)
    assert compute_tier_of_vendor([1, 2, 3, 4], 4).tolist() == [0, 0, 1, 2]


def test_static_profile_does_not_depend_on_sharding() -> None:
    whole = make_fleet(n=40, availability=Availability.RHYTHM)
    p = replace(whole.params)
    half = DeviceFleet(
        model_ids=whole.model_ids,
        model_of=whole.model_of[1::2],
        vendor=whole.vendor[1::2],
        identities=[whole.identity_table[k, : whole.identity_count[k]] for k in range(1, 40, 2)],
        num_classes=CLASSES,
        vendors=4,
        global_index=whole.global_index[1::2],
        params=p,
    )
    assert np.array_equal(half.night_start_h, whole.night_start_h[1::2])
    assert np.array_equal(half.network_tier, whole.network_tier[1::2])
    assert np.array_equal(half.inference_rate, whole.inference_rate[1::2])
    assert half.device_ids == whole.device_ids[1::2]


def test_backlog_seeds_old_feedback() -> None:
    fleet = make_fleet(n=500, initial_backlog=True, cache_capacity=20)
    added = fleet.seed_backlog(draw_rows, np.random.default_rng(0), now=0.0)
    assert added == int(fleet.cached.sum()) > 0
    assert fleet.cache_count.max() <= 20
    ts = fleet.cache_ts[fleet.cache_count > 0]
    assert (ts <= 0).all() and (ts >= -DAY).all()
