"""The training recipe: pure functions from (head, features, labels) to a trained head.

No Kafka, no Faust, no settings object: the trainer process assembles a dataset from the
feature log and calls these; the benchmark calls the very same step. The recipe trains the
thawed layers with AdamW on shuffled minibatches of cross-entropy (the shared loop of
:mod:`pipeline.head_loop`, whose device helpers are re-exported here), warm-started from the
champion's head by the caller (:func:`warm_start`), and judges champion and challenger on one
validation set (:func:`champion_challenger`: a tie is not a win). Which samples the job
trains and validates on is :mod:`trainer.replay`'s.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn

from pipeline import head_loop
from pipeline.head_loop import Schedule, accuracy, train_epochs, trainable_parameters
from pipeline.head_loop import as_tensor as as_tensor
from pipeline.head_loop import autocast as autocast
from pipeline.head_loop import batch_bounds as batch_bounds
from pipeline.head_loop import configure_threads as configure_threads
from pipeline.head_loop import resolve_device as resolve_device
from pipeline.head_loop import train_step as train_step
from pipeline.zoo import load_head_state


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """How to train a head. ``device`` is a torch device string or ``"auto"`` (CUDA when
    present). ``amp`` turns on bf16 autocast, on CUDA only (the CPU keeps fp32: its bf16
    matmuls are no faster on these machines and hurt accuracy). ``threads`` caps CPU
    threads (None: every core this process may run on).
    """

    epochs: int = 10
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    threads: int | None = None
    #: Dense weight averaging from this fraction of the steps on (``Schedule.swa_start``).
    swa_start: float | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be ≥ 1")
        if not self.lr > 0:
            raise ValueError("lr must be > 0")


@dataclass(frozen=True, slots=True)
class EpochStats:
    epoch: int
    mean_loss: float
    samples: int
    seconds: float

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else math.inf


@dataclass(frozen=True, slots=True)
class TrainResult:
    """Per-epoch mean loss and the cost of training (samples seen / wall seconds)."""

    epochs: list[EpochStats] = field(default_factory=list)
    seconds: float = 0.0
    samples: int = 0

    @property
    def losses(self) -> list[float]:
        return [e.mean_loss for e in self.epochs]

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else math.inf


# --------------------------------------------------------------------------- training


def make_optimizer(head: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the head's trainable parameters. The fused kernel (one pass over param,
    grad and both moments) on CUDA and CPU; where it is not available, the foreach one."""
    params = trainable_parameters(head)
    if not params:
        raise ValueError("the head has no trainable parameters")
    try:
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)


def train_head(
    head: nn.Module,
    features: npt.ArrayLike | Tensor,
    labels: npt.ArrayLike | Tensor,
    cfg: TrainConfig,
    *,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> TrainResult:
    """Train ``head`` in place on ``features`` (N, *feature_shape) and ``labels`` (N,).

    The dataset is converted once to float32 on the training device and shuffled per epoch
    by a generator seeded with ``cfg.seed`` (so runs repeat); a last batch of one is folded
    into the one before (:func:`pipeline.head_loop.train_epochs`). Losses are accumulated on
    the device and read once per epoch, so the GPU never waits for the host.
    """
    device = resolve_device(cfg.device)
    if device.type == "cpu":
        configure_threads(cfg.threads)
    x_all = as_tensor(features, device, torch.float32)
    y_all = as_tensor(labels, device, torch.long)
    n = int(x_all.shape[0])
    if n == 0 or int(y_all.shape[0]) != n:
        raise ValueError(f"need as many labels as features, and some: {n} vs {y_all.shape[0]}")
    head.to(device).train()
    optimizer = make_optimizer(head, cfg, device)
    epochs: list[EpochStats] = []
    started = t0 = time.perf_counter()
    schedule = Schedule(cfg.epochs, cfg.batch_size, cfg.seed, amp=cfg.amp, swa_start=cfg.swa_start)
    losses = train_epochs(head, optimizer, x_all, y_all, schedule)
    for epoch, mean_loss in enumerate(losses):
        stats = EpochStats(epoch, mean_loss, n, time.perf_counter() - t0)
        epochs.append(stats)
        if on_epoch is not None:
            on_epoch(stats)
        t0 = time.perf_counter()
    return TrainResult(epochs=epochs, seconds=time.perf_counter() - started, samples=n * cfg.epochs)


def predict(
    head: nn.Module,
    features: npt.ArrayLike | Tensor,
    *,
    batch_size: int = 1024,
    device: str = "auto",
) -> Tensor:
    """Predicted class per sample (eval mode), on the CPU."""
    return head_loop.predict(head, features, batch_size=batch_size, device=resolve_device(device))


def evaluate(
    head: nn.Module,
    features: npt.ArrayLike | Tensor,
    labels: npt.ArrayLike | Tensor,
    batch_size: int = 1024,
    *,
    device: str = "auto",
) -> float:
    """Top-1 accuracy of ``head`` in eval mode; NaN for an empty set (nothing to judge).
    Rounded to float32, as the trainer has always measured and published it."""
    exact = accuracy(head, features, labels, batch_size=batch_size, device=resolve_device(device))
    return float(np.float32(exact))


def warm_start(head: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Start from the champion: load its head state in place (strict; see
    :func:`pipeline.zoo.load_head_state`)."""
    load_head_state(head, state_dict)


# --------------------------------------------------------------------------- validation


@dataclass(frozen=True, slots=True)
class Verdict:
    is_best: bool
    reason: str


def champion_challenger(
    challenger_accuracy: float,
    champion_accuracy: float | None,
    *,
    val_samples: int,
    margin: float = 0.0,
) -> Verdict:
    """Decide whether the challenger becomes the best model.

    Both accuracies must come from the same validation set. The challenger wins only when
    it beats the champion by more than ``margin`` (``challenger > champion + margin``,
    strictly): a tie is not a win, so a version that measures no better is not shipped to
    every device (``promote_margin`` in the settings). With no champion the challenger wins;
    with an empty validation set it cannot be judged and loses to an existing champion.
    """
    if margin < 0 or math.isnan(margin):
        raise ValueError(f"margin must be ≥ 0, got {margin}")
    if champion_accuracy is None or math.isnan(champion_accuracy):
        return Verdict(True, "no champion")
    if val_samples <= 0 or math.isnan(challenger_accuracy):
        return Verdict(False, "empty validation split: champion kept")
    if challenger_accuracy > champion_accuracy + margin:
        return Verdict(
            True,
            f"challenger {challenger_accuracy:.4f} > champion {champion_accuracy:.4f} + {margin:g}",
        )
    return Verdict(
        False,
        f"challenger {challenger_accuracy:.4f} ≤ champion {champion_accuracy:.4f} + {margin:g}",
    )
