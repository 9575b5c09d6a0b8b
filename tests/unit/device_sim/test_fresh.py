"""Fresh features: every sample its own vector, a pure function of its row, spread like the
real features of its cell, never a copy of a bank row."""

from __future__ import annotations

import numpy as np
import pytest

from device_sim.bank import FeatureBank
from device_sim.expansion import expand
from device_sim.feature_model import fit
from device_sim.fresh import DRAW_BITS, FreshFeatures, scramble
from pipeline.errors import ConfigError
from tests.unit.device_sim.test_expansion import SMALL
from tests.unit.device_sim.test_feature_model import generate, known_model


@pytest.fixture(scope="module")
def bank() -> FeatureBank:
    rng = np.random.default_rng(0)
    return expand(fit(*generate(known_model(rng), rng), rank=8), SMALL)


@pytest.fixture(scope="module")
def source(bank: FeatureBank) -> FreshFeatures:
    return FreshFeatures(bank, vendors=np.asarray([1, 2, 1, 2]), seed=3, rank=8)


def test_the_scramble_is_a_bijection_onto_36_bits() -> None:
    t = np.arange(1_000_000, dtype=np.int64)
    out = scramble(t)
    assert np.unique(out).size == t.size
    assert out.min() >= 0 and out.max() < 1 << DRAW_BITS
    top = np.asarray([(1 << DRAW_BITS) - 1 - k for k in range(1000)], dtype=np.int64)
    assert np.unique(np.concatenate([out, scramble(top)])).size == t.size + 1000


def test_every_draw_is_new_and_its_features_repeat_for_a_re_sent_row(
    source: FreshFeatures,
) -> None:
    rng = np.random.default_rng(1)
    devices = np.tile(np.arange(4, dtype=np.int64), 500)
    identities = np.full(devices.size, 7, dtype=np.int64)
    rows = source.draw(0, devices, identities, rng)
    again = source.draw(0, devices, identities, rng)
    assert np.intersect1d(rows, again).size == 0
    x = source.features(rows)
    assert x.dtype == np.float16 and x.shape == (devices.size, 24)
    assert np.array_equal(source.features(rows[::-1]), x[::-1])  # a pure function of the row
    vectors = {row.tobytes() for row in np.concatenate([x, source.features(again)])}
    assert len(vectors) == 2 * devices.size


def test_a_cell_s_draws_centre_on_its_real_features_and_spread_like_them(
    source: FreshFeatures, bank: FeatureBank
) -> None:
    rng = np.random.default_rng(2)
    real = bank.features[bank.select("faces-1", domains=[2], identities=[7], holdout=False)]
    devices = np.full(4000, 1, dtype=np.int64)  # vendor 2
    x = source.features(source.draw(0, devices, np.full(4000, 7, dtype=np.int64), rng))
    x64, real64 = x.astype(np.float64), real.astype(np.float64)
    # 4,000 draws of a within-cell spread of ~1.5 per dimension: the mean within ~0.1.
    assert np.abs(x64.mean(axis=0) - real64.mean(axis=0)).max() < 0.15
    spread = ((x64 - x64.mean(axis=0)) ** 2).sum(axis=1).mean()
    real_spread = ((real64 - real64.mean(axis=0)) ** 2).sum(axis=1).mean()
    assert spread == pytest.approx(real_spread, rel=0.5)  # a cell of 12 rows: a rough check
    bank_vectors = {row.tobytes() for row in bank.features}
    assert not any(row.tobytes() in bank_vectors for row in x)


def test_a_fresh_source_says_when_its_pool_does_not_fit(bank: FeatureBank) -> None:
    with pytest.raises(ConfigError, match="pool_bits"):
        FreshFeatures(bank, vendors=[1], pool_bits=13)
