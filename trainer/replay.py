"""What a job trains and is judged on: its new samples, a replay of the window, and the
model's fixed validation set. Pure numpy, no Kafka, no torch.

The feature log is the training set. A job's *window* (:meth:`FeatureCache.window
<trainer.dataset.FeatureCache.window>`) is every sample of its model held in its ranges'
partitions below the ranges' ends, in log order; its *new* samples are those whose first
copy is inside its ranges. :func:`plan_job` splits the window three ways:

* **validation**: the samples :class:`~pipeline.samples.ValidationRule` holds out (whole
  validation devices, plus a share of the other devices' samples by key hash). They are
  never trained on, neither as new samples nor as replay. The model's validation set is the
  first ``val_max_samples`` of them in log order: it grows with the log until it is full
  and is then the same set for every later job, so champion and challenger, and one version
  and the next, are measured on the same samples (until retention removes its first
  samples from the log; the set then moves on to the first ones retained);
* **train**: the new samples that are not validation; each is new in exactly one job;
* **replay**: at most ``replay_max_samples`` of the other training samples of the window
  (earlier jobs' samples), chosen by :func:`select_replay`: balanced over labels, and within
  a label spread over devices, deterministic given the job's seed.

Trained on new samples alone, warm-started from the champion, a small trigger pulls the
head towards a few devices and classes and forgets the rest; the replay keeps the whole
window in every job's loss at a bounded cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True, slots=True, eq=False)
class JobPlan:
    """Positions in the job's window (log order): ``train`` its new training samples,
    ``replay`` the earlier samples trained again, ``val`` the model's validation set;
    ``held_out`` how many of the job's new samples are validation."""

    train: npt.NDArray[np.intp]
    replay: npt.NDArray[np.intp]
    val: npt.NDArray[np.intp]
    held_out: int

    @property
    def trained(self) -> npt.NDArray[np.intp]:
        """Every position the job trains on: its new samples, then the replay."""
        return np.concatenate([self.train, self.replay])


def plan_job(
    *,
    new: npt.NDArray[np.bool_],
    validation: npt.NDArray[np.bool_],
    labels: npt.NDArray[np.integer],
    devices: npt.NDArray[np.integer],
    val_max_samples: int,
    replay_max_samples: int,
    seed: int,
) -> JobPlan:
    """Split a window (every argument one entry per sample, in log order) into the job's
    new training samples, its replay and the model's validation set (module docstring)."""
    n = new.shape[0]
    if not validation.shape[0] == labels.shape[0] == devices.shape[0] == n:
        raise ValueError("new, validation, labels and devices must be one per window sample")
    if val_max_samples < 1 or replay_max_samples < 0:
        raise ValueError("val_max_samples must be ≥ 1 and replay_max_samples ≥ 0")
    val = np.flatnonzero(validation)[:val_max_samples]
    train = np.flatnonzero(new & ~validation)
    pool = np.flatnonzero(~new & ~validation)
    picked = select_replay(labels[pool], devices[pool], replay_max_samples, seed)
    return JobPlan(
        train=train,
        replay=np.sort(pool[picked]),
        val=val,
        held_out=int((new & validation).sum()),
    )


def select_replay(
    labels: npt.NDArray[np.integer],
    devices: npt.NDArray[np.integer],
    budget: int,
    seed: int,
) -> npt.NDArray[np.intp]:
    """At most ``budget`` indices into a pool of samples (their ``labels`` and ``devices``,
    in a canonical order such as the log's), stratified: round-robin over labels, so every
    label gets ``budget / labels`` samples or all it has (counts differ by at most one
    between labels that have more), and within a label round-robin over its devices, so
    one talkative device does not fill its label's share. Ties are broken by one random
    permutation of the pool seeded with ``seed``: the same pool and seed give the same
    replay. The whole pool when it fits the budget."""
    n = int(labels.shape[0])
    if budget <= 0 or n == 0:
        return np.empty(0, np.intp)
    if n <= budget:
        return np.arange(n, dtype=np.intp)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)  # position in this order breaks every tie
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n)
    # Within (label, device): the k-th sample of a device in random order...
    per_device = _ranks_within(_group_ids(labels, devices), rank)
    # ...within a label: every device's first sample, then every device's second, ...
    per_label = _ranks_within(_group_ids(labels), per_device * n + rank)
    # ...overall: every label's first, then every label's second, ...
    chosen = np.lexsort((rank, per_label))[:budget]
    return np.sort(chosen).astype(np.intp)


def _group_ids(*columns: npt.NDArray[np.integer]) -> npt.NDArray[np.intp]:
    """One integer per distinct row of ``columns`` (non-negative integers)."""
    key = np.zeros(columns[0].shape[0], np.int64)
    for column in columns:
        values = np.asarray(column, np.int64)
        _, codes = np.unique(values, return_inverse=True)
        key = key * (int(codes.max(initial=0)) + 1) + codes
    return np.asarray(key, dtype=np.intp)


def _ranks_within(
    groups: npt.NDArray[np.intp], keys: npt.NDArray[np.int64]
) -> npt.NDArray[np.int64]:
    """Each element's rank by ``keys`` (distinct) among the elements of its group."""
    order = np.lexsort((keys, groups))
    sorted_groups = groups[order]
    starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
    sizes = np.diff(np.r_[starts, len(order)])
    ranks = np.empty(len(order), np.int64)
    ranks[order] = np.arange(len(order)) - np.repeat(starts, sizes)
    return ranks
