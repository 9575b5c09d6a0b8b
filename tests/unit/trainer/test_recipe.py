"""The training recipe: the loss falls, accuracy rises, the split is stable."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.samples import split_train_val, stable_unit_hash
from pipeline.zoo import ZooError
from trainer.recipe import (
    EpochStats,
    TrainConfig,
    champion_challenger,
    evaluate,
    train_head,
    warm_start,
)

CLASSES, DIM = 5, 16


def _data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs around one centre per class, as float16 like a device push."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(123).normal(size=(CLASSES, DIM)) * 3
    labels = rng.integers(0, CLASSES, size=n).astype(np.int32)
    features = centres[labels] + rng.normal(size=(n, DIM))
    return features.astype(np.float16), labels


def _head(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DIM, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, CLASSES))


def test_loss_falls_and_accuracy_rises() -> None:
    features, labels = _data(600)
    val_x, val_y = _data(200, seed=1)
    head = _head()
    before = evaluate(head, val_x, val_y, batch_size=64, device="cpu")
    seen: list[EpochStats] = []
    cfg = TrainConfig(epochs=5, batch_size=64, lr=1e-2, seed=0, device="cpu")
    result = train_head(head, features, labels, cfg, on_epoch=seen.append)
    after = evaluate(head, val_x, val_y, batch_size=64, device="cpu")
    assert len(result.epochs) == 5
    assert seen == result.epochs
    assert result.losses[-1] < 0.5 * result.losses[0]
    assert after > 0.9
    assert after > before + 0.3
    assert result.samples == 600 * 5
    assert result.samples_per_s > 0
    assert result.seconds > 0
    assert not head.training


def test_training_repeats_with_the_seed() -> None:
    features, labels = _data(130)  # 130 = 2x64 + 2: no batch of one for BatchNorm
    cfg = TrainConfig(epochs=2, batch_size=64, seed=3, device="cpu")
    a, b = _head(), _head()
    ra = train_head(a, features, labels, cfg)
    rb = train_head(b, torch.from_numpy(features), torch.from_numpy(labels), cfg)
    assert ra.losses == rb.losses
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_a_trailing_batch_of_one_is_folded_and_read_only_arrays_are_fine() -> None:
    features, labels = _data(65)
    features.flags.writeable = False
    labels = labels.astype(np.int64)
    labels.flags.writeable = False
    train_head(_head(), features, labels, TrainConfig(epochs=1, batch_size=64, device="cpu"))


def test_warm_start_loads_the_champion() -> None:
    champion, challenger = _head(1), _head(2)
    warm_start(challenger, champion.state_dict())
    for pa, pb in zip(
        champion.state_dict().values(), challenger.state_dict().values(), strict=True
    ):
        assert torch.equal(pa, pb)
    with pytest.raises(ZooError):
        warm_start(challenger, {"0.weight": torch.zeros(1)})


def test_evaluate_of_nothing_is_nan() -> None:
    assert math.isnan(evaluate(_head(), np.zeros((0, DIM), np.float16), np.zeros(0, np.int32), 8))


def test_split_is_deterministic_and_near_the_fraction() -> None:
    keys = [(f"device-{d}", s) for d in range(40) for s in range(250)]
    mask = split_train_val(keys, 0.2)
    assert mask.dtype == np.bool_
    assert mask.shape == (len(keys),)
    assert abs(mask.mean() - 0.2) < 0.02
    assert np.array_equal(mask, split_train_val(list(reversed(keys)), 0.2)[::-1])
    # a sample's side never depends on what else is in the dataset
    assert np.array_equal(split_train_val(keys[:100], 0.2), mask[:100])
    assert split_train_val(keys, 0.0).sum() == 0
    assert stable_unit_hash("device-0", 0) == stable_unit_hash("device-0", 0)
    # pinned: the same in every process and Python version (blake2b, not hash())
    assert stable_unit_hash("device-0", 0) == 0.2262450120452704
    assert stable_unit_hash("phone-42", 1234567) == 0.03473376211665904
    with pytest.raises(ValueError, match="val_fraction"):
        split_train_val(keys, 1.0)


def test_champion_challenger_a_tie_is_not_a_win() -> None:
    assert champion_challenger(0.1, None, val_samples=10).is_best  # the first candidate wins
    assert champion_challenger(0.1, None, val_samples=10, margin=0.5).is_best
    assert champion_challenger(0.8, 0.7, val_samples=10).is_best
    assert not champion_challenger(0.7, 0.7, val_samples=10).is_best  # a tie keeps the champion
    assert not champion_challenger(0.704, 0.7, val_samples=10, margin=0.005).is_best
    assert not champion_challenger(0.705, 0.7, val_samples=10, margin=0.005).is_best  # strictly
    verdict = champion_challenger(0.706, 0.7, val_samples=10, margin=0.005)
    assert verdict.is_best and "0.7060 > champion 0.7000 + 0.005" in verdict.reason
    assert not champion_challenger(0.6, 0.7, val_samples=10).is_best
    assert not champion_challenger(math.nan, 0.7, val_samples=0).is_best
    with pytest.raises(ValueError, match="margin"):
        champion_challenger(0.8, 0.7, val_samples=10, margin=-0.01)
