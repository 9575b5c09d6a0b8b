"""``fedex bench datafraction``: fraction arithmetic, nested subsets, the curves, and the
sweep on a hand-made bank where the answer is known (the vendor's camera makes identity
``c`` look like clean identity ``c+1``, so v0 is wrong there and user data fixes it)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from device_sim.bank import BANK_FORMAT, FeatureBank
from lab.bench_banks import parse_scale
from lab.datafraction_bench import (
    ARM_MIXED,
    ARM_SWA,
    ARM_SYSTEM,
    ARM_USER,
    Point,
    Recipe,
    curves,
    fixed_validation,
    fraction_counts,
    promotes,
    run_sweeps,
    sweep_model,
    user_subsets,
    vendor_summary,
)
from lab.report_plots import plot_datafraction

CLASSES = 4
PER_GROUP = 16  # images per (identity, domain); the last quarter held out


def toy_bank(*, scramble_labels: bool = False, seed: int = 0) -> FeatureBank:
    """Domain 0 (clean): class means plus noise. Domain 1 (the one vendor): identity
    ``c`` shows the mean of identity ``c+1`` plus a camera offset, so a head trained on
    clean features names the wrong identity. ``scramble_labels`` relabels the vendor's
    training rows at random: no signal to learn from, so retraining cannot help."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((CLASSES, 512)) * 2.0
    offset = rng.standard_normal(512)
    feats, labels, domains, holdout = [], [], [], []
    for domain in (0, 1):
        for c in range(CLASSES):
            noise = 0.5 * rng.standard_normal((PER_GROUP, 512))
            x = means[(c + 1) % CLASSES] + offset if domain else means[c]
            feats.append(x + noise)
            labels += [c] * PER_GROUP
            domains += [domain] * PER_GROUP
            holdout += [i >= PER_GROUP * 3 // 4 for i in range(PER_GROUP)]
    y = np.asarray(labels, dtype=np.int32)
    d = np.asarray(domains, dtype=np.uint8)
    h = np.asarray(holdout, dtype=np.bool_)
    if scramble_labels:
        train_vendor = (d == 1) & ~h
        y[train_vendor] = rng.integers(0, CLASSES, int(train_vendor.sum()))
    n = y.size
    meta = {
        "spec": {"backbone": "mobilenet_v2", "cut": "freeze6", "format": BANK_FORMAT},
        "key": "toy",
        "content_sha256": "toy",
        "models": ["toy"],
        "num_classes": CLASSES,
        "vendors": ["clean", "vendor-1"],
        "pretrain_identities": {"toy": list(range(CLASSES))},
        "device_identities": {"toy": list(range(CLASSES))},
    }
    return FeatureBank(
        path=Path("toy.safetensors"),
        meta=meta,
        features=np.concatenate(feats).astype(np.float16),
        labels=y,
        models=np.zeros(n, dtype=np.int32),
        domains=d,
        image_index=np.arange(n, dtype=np.int32),
        holdout=h,
    )


FAST = Recipe(epochs=15, lr=1e-2, batch_size=32)


# --------------------------------------------------------------------------- pure


def test_fraction_counts_round_half_up_and_cover_the_ends() -> None:
    assert fraction_counts(512) == [0, 10, 26, 51, 128, 256, 512]
    assert fraction_counts(48) == [0, 1, 2, 5, 12, 24, 48]
    assert fraction_counts(0) == [0] * 7
    with pytest.raises(ValueError):
        fraction_counts(10, [1.5])
    with pytest.raises(ValueError):
        fraction_counts(-1)


def test_user_subsets_are_nested_and_seeded() -> None:
    rows = np.arange(100, 200, dtype=np.int64)
    subsets = user_subsets(rows, [0, 5, 50, 100], seed=7)
    assert [s.size for s in subsets] == [0, 5, 50, 100]
    for small, big in itertools.pairwise(subsets):
        assert np.array_equal(big[: small.size], small)
    assert sorted(subsets[-1].tolist()) == rows.tolist()
    assert np.array_equal(user_subsets(rows, [100], 7)[0], subsets[-1])
    assert not np.array_equal(user_subsets(rows, [100], 8)[0], subsets[-1])


def _point(model: str, seed: int, fraction: float, acc: float) -> Point:
    return Point(model, seed, ARM_USER, fraction, 0, 0, acc, 0.5, 0.0)


def test_curves_average_models_per_seed_then_spread_over_seeds() -> None:
    points = [
        _point("a", 0, 0.0, 0.2),
        _point("b", 0, 0.0, 0.4),  # seed 0: (0.2 + 0.4) / 2 = 0.3
        _point("a", 1, 0.0, 0.5),
        _point("b", 1, 0.0, 0.5),  # seed 1: 0.5
        _point("a", 0, 1.0, 0.9),
        _point("a", 1, 1.0, 0.7),
    ]
    (row0, row1) = curves(points)[ARM_USER]
    assert row0["fraction"] == 0.0 and row0["device_accuracy"]["mean"] == pytest.approx(0.4)
    assert row0["device_accuracy"]["min"] == pytest.approx(0.3)
    assert row0["device_accuracy"]["max"] == pytest.approx(0.5)
    assert row0["device_accuracy"]["n"] == 2
    assert row1["device_accuracy"]["mean"] == pytest.approx(0.8)
    assert row1["device_accuracy"]["std"] == pytest.approx(np.std([0.9, 0.7], ddof=1))


# --------------------------------------------------------------------------- the sweep


def _gain(bank: FeatureBank) -> tuple[float, float]:
    sweep = sweep_model(bank, "toy", seeds=[0], fractions=(0.0, 1.0), arms=(ARM_USER,), recipe=FAST)
    by_fraction = {p.fraction: p.device_accuracy for p in sweep.points}
    return by_fraction[0.0], by_fraction[1.0]


def test_user_data_lifts_accuracy_on_a_separable_toy_bank() -> None:
    base, full = _gain(toy_bank())
    assert base <= 0.6  # the camera defeats v0: the comparison below means something
    assert full >= base + 0.3 and full >= 0.9


def test_the_lift_needs_real_labels() -> None:
    # Negative control for the test above: the same sweep on user data with random labels
    # does not reach the accuracy real labels give, so that test can fail.
    _, scrambled = _gain(toy_bank(scramble_labels=True))
    _, real = _gain(toy_bank())
    assert scrambled < real - 0.3


def test_run_sweeps_document_renders_as_a_plot(tmp_path: Path) -> None:
    doc = run_sweeps(
        toy_bank(),
        seeds=[0, 1],
        fractions=(0.0, 0.25, 1.0),
        arms=(ARM_USER, ARM_MIXED),
        recipe=FAST,
    )
    json.dumps(doc)  # plain JSON types only
    model = doc["models"][0]
    assert model["fixed_val_rows"] == 2  # 5% of the 48 device train rows, set aside
    assert model["user_train_rows"] == CLASSES * 12 - 2
    assert model["device_val_rows"] == CLASSES * 4
    user = doc["curves"][ARM_USER]
    assert [r["fraction"] for r in user] == [0.0, 0.25, 1.0]
    assert [r["user_samples"] for r in user] == [0, 12, 46]
    assert set(user[0]["vendor_spread"]) >= {"mean", "std"}
    # 0% is v0 in both arms, with no training
    zero = [p for p in doc["points"] if p["fraction"] == 0.0]
    assert {p["train_samples"] for p in zero} == {0}
    assert doc["curves"][ARM_MIXED][0]["device_accuracy"] == user[0]["device_accuracy"]
    mixed_full = [p for p in doc["points"] if p["fraction"] == 1.0 and p["arm"] == ARM_MIXED]
    assert all(p["train_samples"] == CLASSES * 12 + 46 for p in mixed_full)
    png = tmp_path / "df.png"
    assert plot_datafraction(doc, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_system_arm_ships_the_user_head_only_where_it_beats_v0_on_validation() -> None:
    for bank, expect_promoted in ((toy_bank(), True), (toy_bank(scramble_labels=True), False)):
        sweep = sweep_model(
            bank, "toy", seeds=[0], fractions=(0.0, 1.0), arms=(ARM_USER, ARM_SYSTEM), recipe=FAST
        )
        by = {(p.arm, p.fraction): p for p in sweep.points}
        v0, system, user = by[ARM_SYSTEM, 0.0], by[ARM_SYSTEM, 1.0], by[ARM_USER, 1.0]
        assert system.promoted is expect_promoted
        expected = user if expect_promoted else v0
        assert system.device_accuracy == expected.device_accuracy
        assert system.val_accuracy >= v0.val_accuracy  # never below v0 where it is judged


def test_the_swa_arm_trains_the_user_recipe_with_averaged_weights() -> None:
    sweep = sweep_model(
        toy_bank(), "toy", seeds=[0], fractions=(1.0,), arms=(ARM_USER, ARM_SWA), recipe=FAST
    )
    user, swa = sweep.points
    assert swa.train_samples == user.train_samples > 0
    assert swa.device_accuracy >= 0.9  # averaging keeps what the user data teaches
    with pytest.raises(ValueError, match="unknown arms"):
        sweep_model(toy_bank(), "toy", seeds=[0], arms=("nope",))


def test_fixed_validation_is_disjoint_seed_free_and_capped() -> None:
    rows = np.arange(10_000, 90_000, dtype=np.int64)
    val, rest = fixed_validation(rows)
    assert val.size == 2048 and rest.size == rows.size - 2048
    assert np.intersect1d(val, rest).size == 0
    assert np.array_equal(fixed_validation(rows)[0], val)
    assert promotes(0.51, 0.5) and not promotes(0.504, 0.5) and not promotes(0.5, 0.5)


def test_vendor_summary_names_the_worst_vendor_and_the_spread() -> None:
    correct = np.asarray([1, 1, 0, 1, 0, 0], dtype=np.bool_)
    domains = np.asarray([1, 1, 2, 2, 3, 3], dtype=np.uint8)
    per, gap, worst = vendor_summary(correct, domains)
    assert per == {"1": 1.0, "2": 0.5, "3": 0.0} and gap == 1.0 and worst == 3


def test_scale_is_paper_or_a_fraction() -> None:
    assert parse_scale(None) is None and parse_scale("paper") == 1.0
    assert parse_scale("0.1") == 0.1
    for bad in ("0", "1.5", "big"):
        with pytest.raises(ValueError, match="--scale"):
            parse_scale(bad)
