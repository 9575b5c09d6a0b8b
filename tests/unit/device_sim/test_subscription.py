"""The subscription side without a broker (device_sim.evaluation): per-device held-out
accuracy (vectorised vs a naive per-device loop), refusal of bad checkpoints, and the pure
timing and freshness helpers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from device_sim.bank import FeatureBank
from device_sim.evaluation import (
    HeldOutSet,
    RefusalReason,
    Refused,
    TriggerIndex,
    activation_times,
    covers_offset,
    fanout_seconds,
    load_checkpoint,
    mean_accuracy,
    verify_blob,
)
from device_sim.heads import head_accuracy, new_head
from device_sim.synthetic import random_devices, synthetic_bank
from device_sim.world import World
from pipeline.checkpoints import encode_checkpoint, sha256_hex
from pipeline.records import (
    Backbone,
    ModelMetrics,
    ModelUpdate,
    OffsetRange,
    TrainingTrigger,
    TriggerReason,
)
from pipeline.zoo import head_state_dict
from tests import factories
from tests.unit.device_sim.test_bank import TINY, build_fast


@pytest.fixture(scope="module")
def bank() -> FeatureBank:
    return synthetic_bank(models=("m1", "m2"), identities=6, vendors=3, seed=1)


def naive_accuracy(
    bank: FeatureBank,
    model_id: str,
    vendors: np.ndarray,
    identities: list[np.ndarray],
    predicted_by_row: dict[int, int],
) -> np.ndarray:
    out = np.full(len(vendors), np.nan)
    for k, (vendor, ids) in enumerate(zip(vendors, identities, strict=True)):
        rows = bank.held_out(model_id, int(vendor), ids)
        if rows.size:
            out[k] = np.mean([predicted_by_row[int(r)] == bank.labels[r] for r in rows])
    return out


def test_device_accuracy_equals_a_per_device_loop(bank: FeatureBank) -> None:
    vendors, identities = random_devices(bank, "m2", 300, seed=4, per_device=(1, 4))
    identities[7] = np.array([2, 2, 5])  # duplicates count once, as in bank.held_out
    identities[8] = np.array([], dtype=np.int64)  # no held-out rows: NaN
    held = HeldOutSet.for_devices(bank, "m2", vendors, identities)
    assert held.devices == 300
    assert held.rows <= bank.select("m2", holdout=True).size
    assert (bank.models[held.bank_rows] == 1).all() and bank.holdout[held.bank_rows].all()
    # Predictions right on a random ~half of the rows: every device gets its own share.
    rng = np.random.default_rng(0)
    predicted = np.where(rng.random(held.rows) < 0.5, held.labels, (held.labels + 1) % 6)
    accuracy = held.device_accuracy(predicted)
    expected = naive_accuracy(
        bank,
        "m2",
        vendors,
        identities,
        dict(zip(held.bank_rows.tolist(), predicted.tolist(), strict=True)),
    )
    assert accuracy.dtype == np.float32 and accuracy.shape == (300,)
    np.testing.assert_allclose(accuracy, expected, rtol=1e-6, equal_nan=True)
    assert math.isnan(accuracy[8]) and np.isfinite(np.delete(accuracy, 8)).all()
    assert len(set(np.round(accuracy[np.isfinite(accuracy)], 3).tolist())) > 3
    assert mean_accuracy(accuracy) == pytest.approx(float(np.nanmean(expected)), rel=1e-5)
    with pytest.raises(Exception, match="predictions"):
        held.device_accuracy(predicted[:-1])


def test_evaluate_runs_the_head_once_for_every_device(bank: FeatureBank) -> None:
    vendors, identities = random_devices(bank, "m1", 2000, seed=2)
    held = HeldOutSet.for_devices(bank, "m1", vendors, identities)
    # Shared (vendor, identity) cells: 2000 devices, at most 3 x 6 cells of 2 rows.
    assert held.cells <= 18 and held.rows == 2 * held.cells
    head = new_head(bank.backbone, bank.cut, bank.num_classes)
    calls: list[int] = []
    head.register_forward_hook(lambda module, args, out: calls.append(int(args[0].shape[0])))
    accuracy = held.evaluate(head)
    assert calls == [held.rows]
    predicted = {int(r): int(p) for r, p in zip(held.bank_rows, held.predict(head), strict=True)}
    expected = naive_accuracy(bank, "m1", vendors[:50], identities[:50], predicted)
    np.testing.assert_allclose(accuracy[:50], expected, rtol=1e-6)


@pytest.mark.slow
def test_matches_head_accuracy_on_a_built_bank(tmp_path: Path) -> None:
    """On a real (tiny) bank, each device's accuracy is head_accuracy on bank.held_out."""
    bank = build_fast(World(TINY), tmp_path)
    world = World(TINY)
    profiles = [world.device_profile("m1", f"dev-{k}") for k in range(40)]
    vendors = np.array([p.vendor for p in profiles])
    held = HeldOutSet.for_devices(bank, "m1", vendors, [p.identities for p in profiles])
    head = new_head(bank.backbone, bank.cut, bank.num_classes, seed=3)
    accuracy = held.evaluate(head)
    for k, p in enumerate(profiles):
        rows = bank.held_out("m1", p.vendor, p.identities)
        assert accuracy[k] == pytest.approx(head_accuracy(head, *bank.take(rows)))


def test_for_devices_checks_its_input(bank: FeatureBank) -> None:
    with pytest.raises(Exception, match="2 vendors but 1"):
        HeldOutSet.for_devices(bank, "m1", [1, 2], [[0]])
    with pytest.raises(Exception, match="vendor out of range"):
        HeldOutSet.for_devices(bank, "m1", [9], [[0]])
    with pytest.raises(Exception, match="identity out of range"):
        HeldOutSet.for_devices(bank, "m1", [1], [[99]])
    empty = HeldOutSet.for_devices(bank, "m1", [], [])
    assert empty.devices == 0 and empty.evaluate(new_head(bank.backbone, bank.cut, 6)).size == 0


# --------------------------------------------------------------------------- refusal


def update_for(blob: bytes, *, sha: str | None = None, num_classes: int = 6) -> ModelUpdate:
    return factories.update(
        "m1",
        "v1",
        trigger_id="m1:1",
        backbone=Backbone.MOBILENET_V2,
        num_classes=num_classes,
        checkpoint_uri="http://server/v1/models/m1/checkpoints/v1",
        sha256=sha or sha256_hex(blob),
        metrics=ModelMetrics(0.5, None, 10, 2, 0.1, 1),
        blob=blob,
    )


def test_a_verified_checkpoint_loads_and_a_bad_one_is_refused(bank: FeatureBank) -> None:
    vendors, identities = random_devices(bank, "m1", 20, seed=0)
    held = HeldOutSet.for_devices(bank, "m1", vendors, identities)
    head = new_head(bank.backbone, bank.cut, bank.num_classes, seed=0)
    before = {k: v.clone() for k, v in head_state_dict(head).items()}
    trained = head_state_dict(new_head(bank.backbone, bank.cut, bank.num_classes, seed=5))
    blob = encode_checkpoint(trained)

    tampered = bytearray(blob)
    tampered[-1] ^= 0x01
    with pytest.raises(Refused) as info:
        verify_blob(update_for(blob), bytes(tampered))
    assert info.value.reason is RefusalReason.SHA256_MISMATCH

    garbage = b"\x00" * 64
    with pytest.raises(Refused) as info:
        load_checkpoint(head, held, update_for(garbage), garbage)
    assert info.value.reason is RefusalReason.DECODE_FAILED

    with pytest.raises(Refused) as info:
        load_checkpoint(head, held, update_for(blob, num_classes=7), blob)
    assert info.value.reason is RefusalReason.INCOMPATIBLE

    other = encode_checkpoint(head_state_dict(new_head(bank.backbone, bank.cut, 7)))
    with pytest.raises(Refused) as info:
        load_checkpoint(head, held, update_for(other), other)
    assert info.value.reason is RefusalReason.SHAPE_MISMATCH

    for key, value in head_state_dict(head).items():  # refusals left the head alone
        assert torch.equal(value, before[key])

    verify_blob(update_for(blob), blob)
    state = load_checkpoint(head, held, update_for(blob), blob)
    assert set(state) == set(before)
    torch.testing.assert_close(
        head_state_dict(head)["logits.weight"], trained["logits.weight"], atol=1e-2, rtol=1e-2
    )


# --------------------------------------------------------------------------- timing helpers


def test_activation_times_add_each_devices_transfer() -> None:
    assert activation_times(100.0, devices=3).tolist() == [100.0, 100.0, 100.0]
    assert activation_times(100.0, [0.5, 2.0, 0.0]).tolist() == [100.5, 102.0, 100.0]
    with pytest.raises(ValueError, match="devices"):
        activation_times(100.0)
    with pytest.raises(ValueError, match="≥ 0"):
        activation_times(100.0, [-1.0])


def test_fanout_seconds_reads_the_quantile_of_devices() -> None:
    times = 10.0 + np.arange(100, dtype=np.float64)  # device k active at 10 + k
    assert fanout_seconds(9.0, times, 0.99) == pytest.approx(100.0)  # 99th device: 10 + 98 + 1
    assert fanout_seconds(9.0, times, 1.0) == pytest.approx(100.0)
    assert fanout_seconds(9.0, times, 0.5) == pytest.approx(51.0)
    assert math.isnan(fanout_seconds(0.0, []))


def test_trigger_ranges_say_which_version_includes_a_push() -> None:
    index = TriggerIndex()
    ranges = (OffsetRange(0, 10, 20), OffsetRange(2, 0, 5))
    index.add(TrainingTrigger("m1", "m1:1", ranges, 15, TriggerReason.COUNT))
    assert index.covers("m1:1") == ranges and index.covers("m1:2") is None
    assert index.covers(None) is None and len(index) == 1
    assert covers_offset(ranges, 0, 10) and covers_offset(ranges, 0, 19)
    assert not covers_offset(ranges, 0, 20) and not covers_offset(ranges, 1, 12)
    assert covers_offset(ranges, 2, 4) and not covers_offset((), 0, 0)
