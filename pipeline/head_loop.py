"""The one loop that trains and judges a head on features.

Shuffled minibatches of cross-entropy, one optimizer step each, bf16 autocast on CUDA when
asked; top-1 accuracy in eval mode. Pure torch: no Kafka, no settings, no files. The
trainer's recipe (``trainer.recipe``), the simulator's base heads (``device_sim.heads``)
and the FedAvg baseline's devices (``lab.fedavg_devices``) all train through
:func:`train_epochs` and judge through :func:`accuracy`; each brings its own optimizer
and :class:`Schedule` (what becomes of a batch of one sample, :data:`Tail`, among others).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn

#: What becomes of a minibatch of one sample (BatchNorm in train mode cannot take it):
#: ``"fold"`` adds a last batch of one to the batch before it; ``"drop"`` skips every batch
#: of one, unless the whole set is one sample.
Tail = Literal["fold", "drop"]

CPU = torch.device("cpu")


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


def trainable_parameters(head: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimizer of ``head`` steps (the thawed ones)."""
    return [p for p in head.parameters() if p.requires_grad]


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


def batch_bounds(n: int, batch_size: int, *, tail: Tail = "fold") -> list[tuple[int, int]]:
    """``[start, stop)`` of each minibatch of ``n`` samples, a batch of one treated as
    ``tail`` says."""
    if tail == "drop":
        bounds = [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
        return [(a, b) for a, b in bounds if b - a >= 2 or n < 2]
    stops = list(range(batch_size, n, batch_size))
    if stops and n - stops[-1] == 1:
        stops.pop()
    starts = [0, *stops]
    return list(zip(starts, [*stops, n], strict=True))


@dataclass(frozen=True, slots=True)
class Schedule:
    """How :func:`train_epochs` goes over a set: ``epochs`` passes in minibatches of
    ``batch_size``, shuffled from ``seed``; bf16 autocast on CUDA when ``amp``; a batch of
    one as ``tail`` says; each epoch's loss summed on the device in ``sum_dtype``; the
    weights averaged densely from ``swa_start`` of the steps on."""

    epochs: int
    batch_size: int
    seed: int
    amp: bool = False
    tail: Tail = "fold"
    sum_dtype: torch.dtype = torch.float32
    #: Dense weight averaging (SWA/SWAD): from this fraction of the steps on, the head's
    #: trainable weights are averaged over every step and the head ends as that average
    #: (BatchNorm statistics recomputed). ``None``: the last step's weights.
    swa_start: float | None = None

    def __post_init__(self) -> None:
        if self.swa_start is not None and not 0.0 <= self.swa_start < 1.0:
            raise ValueError(f"swa_start must be in [0, 1), got {self.swa_start}")

    @classmethod
    def plain(cls, epochs: int, batch_size: int, seed: int) -> Schedule:
        """The simulator's heads and FedAvg's devices: fp32, batches of one dropped, the
        loss summed in float64 (as a Python float would)."""
        return cls(epochs, batch_size, seed, tail="drop", sum_dtype=torch.float64)


def train_epochs(
    head: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, schedule: Schedule
) -> Iterator[float]:
    """Train ``head`` in place on ``x`` (N, ...) and ``y`` (N,), both on the head's device;
    yields each epoch's mean loss as it ends, and leaves the head in eval mode after the last.

    Every epoch visits the samples in a fresh order drawn from a generator seeded with
    ``schedule.seed`` (so runs repeat). The epoch's loss is read once (the one host sync per
    epoch) and divided by N, dropped batches included.
    """
    n = int(x.shape[0])
    bounds = batch_bounds(n, schedule.batch_size, tail=schedule.tail)
    generator = torch.Generator().manual_seed(schedule.seed)
    average = WeightAverage.of(head, schedule, steps=len(bounds) * schedule.epochs)
    head.train()
    for epoch in range(schedule.epochs):
        total = torch.zeros((), device=x.device, dtype=schedule.sum_dtype)
        order = torch.randperm(n, generator=generator).to(x.device)
        for start, stop in bounds:
            index = order[start:stop]
            loss = train_step(head, optimizer, x[index], y[index], amp=schedule.amp)
            total += loss.to(schedule.sum_dtype) * index.numel()
            if average is not None:
                average.step()
        if average is not None and epoch == schedule.epochs - 1:
            average.apply(head, x, schedule.batch_size)
        yield float(total.item()) / n
    head.eval()


class WeightAverage:
    """The running mean of a head's trainable weights over the steps from ``start`` on."""

    def __init__(self, head: nn.Module, start: int) -> None:
        self.start, self.seen, self.count = start, 0, 0
        self.params = trainable_parameters(head)
        self.mean = [p.detach().clone() for p in self.params]

    @classmethod
    def of(cls, head: nn.Module, schedule: Schedule, *, steps: int) -> WeightAverage | None:
        if schedule.swa_start is None or steps == 0:
            return None
        return cls(head, min(steps - 1, math.floor(schedule.swa_start * steps)))

    @torch.no_grad()
    def step(self) -> None:
        """After an optimizer step: fold the weights in once past ``start``."""
        self.seen += 1
        if self.seen <= self.start:
            return
        self.count += 1
        weight = 1.0 / self.count
        for mean, p in zip(self.mean, self.params, strict=True):
            mean.lerp_(p.detach(), weight)

    @torch.no_grad()
    def apply(self, head: nn.Module, x: Tensor, batch_size: int) -> None:
        """Load the mean into the head and recompute BatchNorm statistics on ``x``."""
        if self.count == 0:
            return
        for mean, p in zip(self.mean, self.params, strict=True):
            p.copy_(mean)
        norms = [m for m in head.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not norms:
            return
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the pass
        head.train()
        for start in range(0, int(x.shape[0]), batch_size):
            if int(x.shape[0]) - start >= 2:
                head(x[start : start + batch_size])
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def predict(
    head: nn.Module,
    features: npt.ArrayLike | Tensor,
    *,
    batch_size: int = 1024,
    device: torch.device = CPU,
) -> Tensor:
    """Predicted class per sample (``head`` moved to ``device``, eval mode), on the CPU."""
    x_all = as_tensor(features, device, torch.float32)
    head.to(device).eval()
    out = [
        head(x_all[i : i + batch_size]).argmax(dim=1) for i in range(0, x_all.shape[0], batch_size)
    ]
    return torch.cat(out).cpu() if out else torch.zeros(0, dtype=torch.long)


def accuracy(
    head: nn.Module,
    features: npt.ArrayLike | Tensor,
    labels: npt.ArrayLike | Tensor,
    *,
    batch_size: int = 1024,
    device: torch.device = CPU,
) -> float:
    """Top-1 accuracy of ``head`` in eval mode, ``correct / N`` exactly (float64); NaN for
    an empty set (nothing to judge)."""
    y = as_tensor(labels, CPU, torch.long)
    if y.numel() == 0:
        return math.nan
    predicted = predict(head, features, batch_size=batch_size, device=device)
    return int((predicted == y).sum().item()) / y.numel()
