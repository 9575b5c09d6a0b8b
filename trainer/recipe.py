"""The training recipe: pure functions from (head, features, labels) to a trained head.

No Kafka, no Faust, no settings object: the trainer process assembles a dataset from the
feature log and calls these; the benchmark calls the very same step. The recipe trains the
thawed layers with AdamW on shuffled minibatches of cross-entropy, warm-started from the
champion's head by the caller (:func:`warm_start`), and validates champion and challenger on
one deterministic split (:func:`pipeline.samples.split_train_val`,
:func:`champion_challenger`).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn

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


# --------------------------------------------------------------------------- device


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` → ``cuda`` when available, else ``cpu``; anything else as torch reads it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def configure_threads(threads: int | None = None) -> int:
    """Use every core this process may run on (torch defaults to physical cores, which
    undercounts in containers with CPU quotas expressed as affinity). Returns the count."""
    if threads is None:
        try:
            threads = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            threads = os.cpu_count() or 1
    threads = max(1, threads)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def as_tensor(array: npt.ArrayLike | Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """One conversion to ``dtype`` on ``device`` (float16 pushes become float32 once, not
    per batch). Read-only arrays (views into decoded messages) are copied by that
    conversion, never written."""
    if isinstance(array, Tensor):
        return array.to(device=device, dtype=dtype)
    target = torch.empty((), dtype=dtype).numpy().dtype
    host = np.asarray(array, dtype=target)
    if not host.flags.writeable:
        host = host.copy()
    return torch.from_numpy(host).to(device=device)


def autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager[object]:
    """bf16 autocast on CUDA when ``amp``; a no-op elsewhere."""
    if amp and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- training


def make_optimizer(head: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the head's trainable parameters. The fused kernel (one pass over param,
    grad and both moments) on CUDA and CPU; where it is not available, the foreach one."""
    params = [p for p in head.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the head has no trainable parameters")
    try:
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)


def train_step(
    head: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    *,
    amp: bool,
) -> Tensor:
    """One optimisation step; returns the detached loss without a host sync."""
    optimizer.zero_grad(set_to_none=True)
    with autocast(x.device, amp):
        logits = head(x)
    loss = nn.functional.cross_entropy(logits.float(), y)
    loss.backward()
    optimizer.step()
    return loss.detach()


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each minibatch. A last batch of one sample would break
    BatchNorm in train mode, so it is folded into the previous one."""
    stops = list(range(batch_size, n, batch_size))
    if stops and n - stops[-1] == 1:
        stops.pop()
    starts = [0, *stops]
    return list(zip(starts, [*stops, n], strict=True))


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
    by a generator seeded with ``cfg.seed`` (so runs repeat). Losses are accumulated on the
    device and read once per epoch, so the GPU never waits for the host.
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
    generator = torch.Generator().manual_seed(cfg.seed)
    epochs: list[EpochStats] = []
    started = time.perf_counter()
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        total = torch.zeros((), device=device)
        order = torch.randperm(n, generator=generator).to(device)
        for start, stop in batch_bounds(n, cfg.batch_size):
            index = order[start:stop]
            loss = train_step(head, optimizer, x_all[index], y_all[index], amp=cfg.amp)
            total += loss * index.numel()
        mean_loss = float(total.item()) / n  # the one sync per epoch
        stats = EpochStats(epoch, mean_loss, n, time.perf_counter() - t0)
        epochs.append(stats)
        if on_epoch is not None:
            on_epoch(stats)
    head.eval()
    return TrainResult(epochs=epochs, seconds=time.perf_counter() - started, samples=n * cfg.epochs)


@torch.no_grad()
def predict(
    head: nn.Module,
    features: npt.ArrayLike | Tensor,
    *,
    batch_size: int = 1024,
    device: str = "auto",
) -> Tensor:
    """Predicted class per sample (eval mode), on the CPU."""
    dev = resolve_device(device)
    x_all = as_tensor(features, dev, torch.float32)
    head.to(dev).eval()
    out = [
        head(x_all[i : i + batch_size]).argmax(dim=1) for i in range(0, x_all.shape[0], batch_size)
    ]
    return torch.cat(out).cpu() if out else torch.zeros(0, dtype=torch.long)


def evaluate(
    head: nn.Module,
    features: npt.ArrayLike | Tensor,
    labels: npt.ArrayLike | Tensor,
    batch_size: int = 1024,
    *,
    device: str = "auto",
) -> float:
    """Top-1 accuracy of ``head`` in eval mode; NaN for an empty set (nothing to judge)."""
    y = as_tensor(labels, torch.device("cpu"), torch.long)
    if y.numel() == 0:
        return math.nan
    predicted = predict(head, features, batch_size=batch_size, device=device)
    return float((predicted == y).float().mean().item())


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
    min_delta: float = 0.0,
) -> Verdict:
    """Decide whether the challenger becomes the best model.

    Both accuracies must come from the same validation split. The challenger wins when
    ``challenger ≥ champion + min_delta``. With the default ``min_delta = 0`` a tie promotes
    the challenger: it was warm-started from the champion and has seen strictly more of the
    users' recent data, so at equal measured accuracy it is the better bet. Set
    ``min_delta > 0`` to require a real gain (fewer checkpoint downloads). With no champion
    the challenger wins; with an empty validation split it cannot be judged and loses to an
    existing champion.
    """
    if champion_accuracy is None or math.isnan(champion_accuracy):
        return Verdict(True, "no champion")
    if val_samples <= 0 or math.isnan(challenger_accuracy):
        return Verdict(False, "empty validation split: champion kept")
    if challenger_accuracy >= champion_accuracy + min_delta:
        return Verdict(
            True, f"challenger {challenger_accuracy:.4f} ≥ champion {champion_accuracy:.4f}"
        )
    return Verdict(
        False, f"challenger {challenger_accuracy:.4f} < champion {champion_accuracy:.4f}"
    )
