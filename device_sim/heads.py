"""Heads on a feature bank: the base model ``v0`` of each model, and a small fit/eval kit.

:func:`train_base_head` trains the thawed layers on the clean images of the pre-training
identities only, so ``v0`` is good there and mediocre on the devices' (vendor-shifted,
partly novel) data: personalization has something to gain. :func:`fit_head` and
:func:`head_accuracy` are the plain AdamW loop and top-1 accuracy the benches share (on
:mod:`pipeline.head_loop`, the loop the trainer trains with).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn

from device_sim.bank import BankError, FeatureBank
from device_sim.images import CLEAN_DOMAIN
from pipeline.head_loop import (
    CPU,
    Schedule,
    accuracy,
    as_tensor,
    train_epochs,
    trainable_parameters,
)
from pipeline.records import Backbone, Cut
from pipeline.zoo import build_backbone, head_state_dict, split


@dataclass(frozen=True)
class BaseHead:
    """The base model ``v0`` of one model id and how good it is where.

    ``pretrain_val_accuracy``: clean held-out images of the pre-training identities.
    ``device_accuracy``: held-out images of the device identities through every vendor's
    camera (what devices will measure), split by vendor in ``vendor_accuracy`` and by
    whether the identity was pre-trained (``seen_device_accuracy``) or not
    (``novel_device_accuracy``, NaN when there are none).
    """

    model_id: str
    backbone: Backbone
    cut: Cut
    num_classes: int
    state_dict: dict[str, Tensor]
    pretrain_val_accuracy: float
    device_accuracy: float
    seen_device_accuracy: float
    novel_device_accuracy: float
    vendor_accuracy: dict[int, float]
    train_samples: int
    train_seconds: float


def new_head(
    backbone: Backbone | str,
    cut: Cut | str,
    num_classes: int,
    *,
    weights: Path | None = None,
    seed: int = 0,
) -> nn.Module:
    """A fresh head (the thawed layers) for ``num_classes`` identities."""
    model = build_backbone(backbone, num_classes=num_classes, weights=weights, seed=seed)
    return split(model, backbone, cut).head


def fit_head(
    head: nn.Module,
    features: npt.ArrayLike,
    labels: npt.ArrayLike,
    *,
    epochs: int = 30,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 128,
    seed: int = 0,
    swa_start: float | None = None,
) -> list[float]:
    """Train ``head`` in place (AdamW, cross-entropy, shuffled minibatches from ``seed``, a
    batch of one skipped; weights averaged from ``swa_start`` of the steps on, see
    :class:`pipeline.head_loop.Schedule`); returns the mean loss per epoch."""
    x = as_tensor(features, CPU, torch.float32)
    y = as_tensor(labels, CPU, torch.long)
    n = int(x.shape[0])
    if n < 2 or int(y.shape[0]) != n:
        raise BankError(f"need ≥ 2 samples and one label each, got {n} and {y.shape[0]}")
    optimizer = torch.optim.AdamW(trainable_parameters(head), lr=lr, weight_decay=weight_decay)
    schedule = replace(Schedule.plain(epochs, batch_size, seed), swa_start=swa_start)
    return list(train_epochs(head, optimizer, x, y, schedule))


def head_accuracy(head: nn.Module, features: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Top-1 accuracy in eval mode; NaN on an empty set."""
    return accuracy(head, features, labels)


def train_base_head(
    bank: FeatureBank,
    model_id: str,
    *,
    epochs: int = 30,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 128,
    seed: int = 0,
    weights: Path | None = None,
) -> BaseHead:
    """Train the base head of ``model_id`` on the clean train images of its pre-training
    identities, and measure it on their clean held-out images and on the devices'
    held-out vendor images. Deterministic in ``seed``."""
    started = time.perf_counter()
    head = new_head(bank.backbone, bank.cut, bank.num_classes, weights=weights, seed=seed)
    pretrain = bank.pretrain_identities(model_id)
    train_rows = bank.select(model_id, domains=[CLEAN_DOMAIN], identities=pretrain, holdout=False)
    val_rows = bank.select(model_id, domains=[CLEAN_DOMAIN], identities=pretrain, holdout=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # dropout in deeper heads
        fit_head(
            head,
            *bank.take(train_rows),
            epochs=epochs,
            lr=lr,
            weight_decay=weight_decay,
            batch_size=batch_size,
            seed=seed,
        )
    seconds = time.perf_counter() - started
    device = bank.device_identities(model_id)
    seen = np.intersect1d(device, pretrain)
    novel = np.setdiff1d(device, pretrain)
    vendors = list(bank.vendor_domains)

    def acc(rows: npt.NDArray[np.int64]) -> float:
        return head_accuracy(head, *bank.take(rows))

    return BaseHead(
        model_id=model_id,
        backbone=bank.backbone,
        cut=bank.cut,
        num_classes=bank.num_classes,
        state_dict=head_state_dict(head),
        pretrain_val_accuracy=acc(val_rows),
        device_accuracy=acc(bank.select(model_id, domains=vendors, holdout=True)),
        seen_device_accuracy=acc(
            bank.select(model_id, domains=vendors, identities=seen, holdout=True)
        ),
        novel_device_accuracy=acc(
            bank.select(model_id, domains=vendors, identities=novel, holdout=True)
        ),
        vendor_accuracy={
            v: acc(bank.select(model_id, domains=[v], identities=device, holdout=True))
            for v in vendors
        },
        train_samples=int(train_rows.size),
        train_seconds=seconds,
    )
