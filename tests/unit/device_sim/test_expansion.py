"""Expanded worlds: the paper's counts exactly, every row its own draw, held-out rows never
trained on, and a bank every bench can read (the base model trains on it)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from device_sim.expansion import (
    PAPER,
    ExpansionConfig,
    expand,
    rows_of_world,
    split_world,
    spread_rows,
    twin,
)
from device_sim.feature_model import FeatureModel, fit
from device_sim.heads import train_base_head
from device_sim.images import CLEAN_DOMAIN
from pipeline.errors import ConfigError
from tests.unit.device_sim.test_feature_model import generate, known_model

SMALL = ExpansionConfig(seed=4, identities=40, device_rows=1001, pretrain_rows=5)


@pytest.fixture(scope="module")
def model() -> FeatureModel:
    rng = np.random.default_rng(0)
    return fit(*generate(known_model(rng), rng), rank=8)


def unique_rows(features: np.ndarray) -> int:
    return len({row.tobytes() for row in features})


def test_the_paper_world_holds_437855_device_features_of_8631_identities() -> None:
    rows = rows_of_world(PAPER, vendors=4)
    assert PAPER.identities == 8631
    assert rows["device_train"] == 437_855
    assert rows["device_holdout"] == 8631 * 4 * PAPER.device_holdout  # 24 per identity
    assert rows_of_world(PAPER.scaled(0.1), vendors=4)["device_train"] == 43_786
    counts = spread_rows(437_855, 8631 * 4, np.random.default_rng(0))
    assert counts.sum() == 437_855 and set(counts.tolist()) == {12, 13}


def test_an_expanded_world_has_its_counts_and_no_row_twice(model: FeatureModel) -> None:
    bank = expand(model, SMALL)
    world = split_world(SMALL, vendors=2)
    device = bank.select(SMALL.model_id, domains=bank.vendor_domains, holdout=False)
    held = bank.select(SMALL.model_id, domains=bank.vendor_domains, holdout=True)
    assert device.size == 1001
    assert held.size == 40 * 2 * SMALL.device_holdout
    assert np.array_equal(bank.pretrain_identities("faces-1"), world.pretrain_identities("faces-1"))
    clean = bank.select("faces-1", domains=[CLEAN_DOMAIN], holdout=False)
    assert clean.size == 30 * SMALL.pretrain_rows
    assert unique_rows(bank.features) == len(bank)  # every row its own draw
    cells = bank.labels[device].astype(np.int64) * 3 + bank.domains[device]
    assert set(np.bincount(cells)[np.bincount(cells) > 0].tolist()) <= {12, 13}


def test_held_out_rows_do_not_move_when_the_train_side_grows(model: FeatureModel) -> None:
    small, large = expand(model, SMALL), expand(model, replace(SMALL, device_rows=3000))
    assert small.content_sha256 == expand(model, SMALL).content_sha256  # deterministic
    held_small = small.features[small.holdout]
    assert np.array_equal(held_small, large.features[large.holdout])
    train = {row.tobytes() for row in large.features[~large.holdout]}
    assert not any(row.tobytes() in train for row in held_small)


def test_the_base_model_trains_on_an_expanded_world() -> None:
    rng = np.random.default_rng(5)
    truth = replace(known_model(rng), mean=np.zeros(24, dtype=np.float32))
    wide = fit(*(_to_512(a) for a in generate(truth, rng)), rank=8)
    bank = expand(wide, replace(SMALL, identities=12, device_rows=600, pretrain_rows=20))
    base = train_base_head(bank, "faces-1", epochs=5)
    assert base.num_classes == 12
    assert 0.0 <= base.device_accuracy <= 1.0 and base.pretrain_val_accuracy > 1 / 12


def _to_512(array: np.ndarray) -> np.ndarray:
    """The features of ``generate`` padded to the backbone's 512 dimensions."""
    if array.ndim == 2:
        return np.pad(array, ((0, 0), (0, 512 - array.shape[1])))
    return array


def test_a_twin_resamples_only_the_train_rows_of_the_fitted_identities(
    model: FeatureModel,
) -> None:
    bank = expand(model, SMALL)
    refit = fit(bank.features, bank.labels, bank.domains, rank=8)
    copy = twin(bank, refit, "faces-1", seed=1)
    assert np.array_equal(copy.features[copy.holdout], bank.features[bank.holdout])
    train = ~bank.holdout
    assert not np.array_equal(copy.features[train], bank.features[train])
    assert copy.key != bank.key and copy.spec["twin_of"] == bank.key

    other = fit(*generate(known_model(np.random.default_rng(9)), np.random.default_rng(9)))
    shifted = replace(other, identities=other.identities + 100)
    with pytest.raises(ConfigError, match="not fitted on"):
        twin(bank, shifted, "faces-1")


def test_an_expansion_config_names_what_is_wrong() -> None:
    with pytest.raises(ConfigError, match="identities"):
        ExpansionConfig(identities=1)
    with pytest.raises(ConfigError, match="scale"):
        PAPER.scaled(0.0)
