"""What a job trains and is judged on: the validation rule (devices and samples held out),
the model's fixed validation set, and the bounded, stratified, deterministic replay."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from pipeline import codec
from pipeline.records import OffsetRange
from pipeline.samples import ValidationRule, device_unit_hash, stable_unit_hash
from tests import factories
from trainer.dataset import FeatureCache
from trainer.replay import plan_job, select_replay

MODEL = "faces-1"
CLASSES = 10


# --------------------------------------------------------------------------- the rule


def test_validation_holds_out_whole_devices_and_a_share_of_the_others_samples() -> None:
    rule = ValidationRule(val_fraction=0.1, val_device_fraction=0.2)
    keys = [(f"dev-{d}", s) for d in range(200) for s in range(50)]
    mask = rule.mask(MODEL, keys)
    held = rule.held_out_devices(MODEL, (d for d, _ in keys))
    assert 20 < len(held) < 60
    by_device = {
        d: mask[i * 50 : (i + 1) * 50] for i, d in enumerate(f"dev-{d}" for d in range(200))
    }
    assert all(by_device[d].all() for d in held)  # every sample of a validation device
    others = np.concatenate([m for d, m in by_device.items() if d not in held])
    assert abs(others.mean() - 0.1) < 0.02
    for (d, s), m in zip(keys, mask, strict=True):
        assert m == (device_unit_hash(MODEL, d) < 0.2 or stable_unit_hash(d, s) < 0.1)
    # A key's side depends on itself and its model alone, not on its company...
    assert np.array_equal(rule.mask(MODEL, keys[:120]), mask[:120])
    # ...and which devices are held out differs between models.
    assert rule.held_out_devices("faces-2", (d for d, _ in keys)) != held
    # Pinned: the same in every process and Python version.
    assert device_unit_hash("faces-1", "dev-0") == device_unit_hash("faces-1", "dev-0")
    assert not ValidationRule(0.1).held_out_devices(MODEL, ["a", "b"])
    with pytest.raises(ValueError, match="val_device_fraction"):
        ValidationRule(0.1, 1.0)


# --------------------------------------------------------------------------- replay


def _pool(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Skewed labels and devices: label 0 and device 0 dominate."""
    rng = np.random.default_rng(seed)
    labels = np.minimum(rng.geometric(0.3, n) - 1, CLASSES - 1)
    devices = np.minimum(rng.geometric(0.2, n) - 1, 30)
    return labels.astype(np.int64), devices.astype(np.int64)


def test_replay_is_bounded_and_takes_everything_that_fits() -> None:
    labels, devices = _pool(500)
    assert len(select_replay(labels, devices, 100, seed=1)) == 100
    assert np.array_equal(select_replay(labels, devices, 500, seed=1), np.arange(500))
    assert np.array_equal(select_replay(labels, devices, 10_000, seed=1), np.arange(500))
    assert len(select_replay(labels, devices, 0, seed=1)) == 0  # 0 disables
    empty = np.empty(0, np.int64)
    assert len(select_replay(empty, empty, 10, seed=1)) == 0
    picked = select_replay(labels, devices, 100, seed=1)
    assert len(set(picked.tolist())) == 100 and np.all(np.diff(picked) > 0)


def test_replay_is_balanced_over_labels_and_spread_over_devices() -> None:
    labels, devices = _pool(5000)
    available = Counter(labels.tolist())
    budget = 300
    picked = select_replay(labels, devices, budget, seed=7)
    counts = Counter(labels[picked].tolist())
    share = budget // CLASSES
    # Labels with enough samples get equal shares (±1); rarer labels give all they have.
    rich = [c for label, c in counts.items() if available[label] > share + 1]
    assert max(rich) - min(rich) <= 1
    assert all(counts[label] == n for label, n in available.items() if n <= share - 1)
    # Random draws would give label 0 about 30% of the budget.
    assert counts[0] <= share + 1
    # Within a label, round-robin over devices: a device has fewer than the most taken
    # from one device, less one, only when it has no more.
    for label in counts:
        taken = Counter(devices[picked][labels[picked] == label].tolist())
        offered = Counter(devices[labels == label].tolist())
        most = max(taken.values())
        assert all(taken[d] >= min(n, most - 1) for d, n in offered.items())


def test_replay_is_deterministic_given_the_seed() -> None:
    labels, devices = _pool(2000)
    a = select_replay(labels, devices, 200, seed=42)
    assert np.array_equal(a, select_replay(labels, devices, 200, seed=42))
    assert not np.array_equal(a, select_replay(labels, devices, 200, seed=43))


# --------------------------------------------------------------------------- the plan


def _window(n: int, new_from: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The first ``n`` samples of one log, the job's new ones from ``new_from``."""
    labels, devices = (column[:n] for column in _pool(10_000, seed))
    rule = ValidationRule(0.1, 0.1)
    keys = [(f"dev-{d}", i) for i, d in enumerate(devices.tolist())]
    new = np.zeros(n, np.bool_)
    new[new_from:] = True
    return {"new": new, "validation": rule.mask(MODEL, keys), "labels": labels, "devices": devices}


def test_the_plan_never_trains_validation_and_replays_only_earlier_jobs() -> None:
    w = _window(3000, new_from=2500)
    plan = plan_job(**w, val_max_samples=10_000, replay_max_samples=400, seed=3)
    val, new = w["validation"], w["new"]
    assert not val[plan.train].any() and not val[plan.replay].any()
    assert new[plan.train].all() and not new[plan.replay].any()
    assert len(plan.replay) == 400
    assert set(plan.train.tolist()) == set(np.flatnonzero(new & ~val).tolist())
    assert plan.held_out == int((new & val).sum()) > 0
    assert np.array_equal(plan.val, np.flatnonzero(val))
    assert np.array_equal(plan.trained, np.concatenate([plan.train, plan.replay]))
    again = plan_job(**w, val_max_samples=10_000, replay_max_samples=400, seed=3)
    assert np.array_equal(again.replay, plan.replay)
    none = plan_job(**w, val_max_samples=10_000, replay_max_samples=0, seed=3)
    assert len(none.replay) == 0 and np.array_equal(none.train, plan.train)


def test_the_validation_set_is_the_first_in_log_order_and_frozen_once_full() -> None:
    w = _window(4000, new_from=3000)
    first = plan_job(**w, val_max_samples=200, replay_max_samples=0, seed=1)
    assert np.array_equal(first.val, np.flatnonzero(w["validation"])[:200])
    # The log grows (a later job): once full, the set is the same samples.
    longer = _window(6000, new_from=5000)
    later = plan_job(**longer, val_max_samples=200, replay_max_samples=0, seed=2)
    assert np.array_equal(later.val, first.val)
    # Not full yet: it grows with the log, keeping what it had.
    small = plan_job(**w, val_max_samples=100_000, replay_max_samples=0, seed=1)
    bigger = plan_job(**longer, val_max_samples=100_000, replay_max_samples=0, seed=2)
    assert set(small.val.tolist()) < set(bigger.val.tolist())


def test_a_plan_rejects_columns_of_other_lengths() -> None:
    w = _window(10, new_from=5)
    w["labels"] = w["labels"][:9]
    with pytest.raises(ValueError, match="one per window sample"):
        plan_job(**w, val_max_samples=5, replay_max_samples=5, seed=0)


# --------------------------------------------------------------------------- the cache


def _cache() -> FeatureCache:
    return FeatureCache(MODEL, backbone="inception_resnet_v1", cut="freeze6", num_classes=CLASSES)


def _add(cache: FeatureCache, partition: int, offset: int, device: str, first: int) -> None:
    push = factories.push(MODEL, device=device, first_id=first, n=10, value=0.0)
    cache.add_record(partition, offset, codec.encode_key(MODEL), codec.encode_push(push))


def test_the_window_is_the_log_up_to_the_job_in_log_order() -> None:
    c = _cache()
    # Read out of order: offsets 3, 0, 2, 1 of partition 0; partition 1 is another window.
    for offset in (3, 0, 2, 1):
        _add(c, 0, offset, f"dev-{offset}", 100 * offset)
    _add(c, 1, 0, "dev-9", 900)
    rows, new = c.window([OffsetRange(0, 2, 3)])
    data = c.take(rows)
    assert data.device_ids == tuple(f"dev-{o}" for o in (0, 1, 2) for _ in range(10))
    assert data.sample_ids.tolist() == [100 * o + k for o in (0, 1, 2) for k in range(10)]
    assert new.tolist() == [False] * 20 + [True] * 10
    codes = c.devices_of(rows).tolist()
    assert len(set(codes)) == 3 and all(len(set(codes[i : i + 10])) == 1 for i in (0, 10, 20))
    assert c.labels_of(rows).tolist() == data.labels.tolist()


def test_the_cache_keeps_each_rows_validation_side() -> None:
    c = _cache()
    for offset in range(20):
        _add(c, 0, offset, f"dev-{offset % 7}", 10 * offset)
    rule = ValidationRule(0.2, 0.2)
    data = c.select()
    assert np.array_equal(c.validation(rule), rule.mask(MODEL, data.keys))
    for offset in range(20, 30):  # grows with the cache
        _add(c, 0, offset, f"dev-{offset % 7}", 10 * offset)
    assert np.array_equal(c.validation(rule), rule.mask(MODEL, c.select().keys))
    other = ValidationRule(0.5)
    assert np.array_equal(c.validation(other), other.mask(MODEL, c.select().keys))
    c.forget_before({0: 10})  # retention compacts the rows, and their sides with them
    assert np.array_equal(c.validation(other), other.mask(MODEL, c.select().keys))
    assert len(c.validation(other)) == len(c) == 200
