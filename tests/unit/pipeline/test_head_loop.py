"""The head loop's dense weight averaging: the head ends as the mean of its weights over the
steps from ``swa_start`` on, with BatchNorm statistics recomputed for those weights."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from pipeline.head_loop import Schedule, train_epochs

N, D, C = 96, 8, 3


class Recording(torch.optim.AdamW):
    """AdamW that keeps the head's weights after every step."""

    def __init__(self, params: list[nn.Parameter], lr: float) -> None:
        super().__init__(params, lr=lr)
        self.trajectory: list[list[torch.Tensor]] = []

    def step(self, closure=None):  # type: ignore[no-untyped-def]
        loss = super().step(closure)
        self.trajectory.append([p.detach().clone() for g in self.param_groups for p in g["params"]])
        return loss


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, D, generator=g), torch.randint(0, C, (N,), generator=g)


def linear() -> nn.Module:
    torch.manual_seed(1)
    return nn.Linear(D, C)


def test_the_head_ends_as_the_mean_of_its_weights_from_swa_start_on() -> None:
    x, y = data()
    plain = Schedule(epochs=4, batch_size=16, seed=2)
    recorded = linear()
    optimizer = Recording(list(recorded.parameters()), lr=0.05)
    list(train_epochs(recorded, optimizer, x, y, plain))
    steps = len(optimizer.trajectory)
    assert steps == 4 * 6
    start = steps // 2

    averaged = linear()
    swa = replace(plain, swa_start=0.5)
    sgd = torch.optim.AdamW(list(averaged.parameters()), lr=0.05)
    list(train_epochs(averaged, sgd, x, y, swa))
    for index, p in enumerate(averaged.parameters()):
        expected = torch.stack([w[index] for w in optimizer.trajectory[start:]]).mean(dim=0)
        torch.testing.assert_close(p.detach(), expected, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(p.detach(), optimizer.trajectory[-1][index])


def test_batchnorm_statistics_are_recomputed_for_the_averaged_weights() -> None:
    x, y = data()
    torch.manual_seed(3)
    head = nn.Sequential(nn.Linear(D, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, C))
    schedule = Schedule(epochs=3, batch_size=16, seed=4, swa_start=0.3)
    list(train_epochs(head, torch.optim.AdamW(list(head.parameters()), lr=0.05), x, y, schedule))
    assert not head.training
    norm = head[1]
    assert isinstance(norm, nn.BatchNorm1d)
    with torch.no_grad():
        pre = head[0](x)
    # The cumulative average over the pass's batches (equal sizes): the batches' mean.
    torch.testing.assert_close(norm.running_mean, pre.mean(dim=0), atol=1e-5, rtol=1e-4)
    assert norm.momentum == 0.1


def test_swa_start_outside_zero_to_one_is_refused() -> None:
    with pytest.raises(ValueError, match="swa_start"):
        Schedule(epochs=1, batch_size=4, seed=0, swa_start=1.0)
