"""The FedAvg comparison's task, per seed: the devices (vendor, identities, fresh samples
and held-out test rows), the trainer's validation split over their pushes, the distinctness
check, and the shared :class:`Evaluator`.

Pure of the broker: both arms of :mod:`lab.fedavg_bench` run on exactly this task, and the
unit tests build it without one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from device_sim.bank import FeatureBank
from device_sim.fresh import FreshFeatures
from device_sim.heads import new_head
from device_sim.world import World
from lab.fedavg_report import distinct_report, vendor_report
from pipeline.settings import Settings


@dataclass(frozen=True, slots=True)
class Device:
    """One device of a seed: its camera and identities, the fresh samples it pushes to
    FedEx and trains on in FedAvg (``sample_ids`` are their fresh rows), and its test rows
    (the bank's real held-out rows of its vendor and identities)."""

    device_id: str
    vendor: int
    identities: npt.NDArray[np.int64]
    sample_ids: npt.NDArray[np.int64]
    features: npt.NDArray[np.float16]
    labels: npt.NDArray[np.int32]
    eval_rows: npt.NDArray[np.int64]


def device_ids(model_id: str, count: int) -> list[str]:
    return [f"{model_id}-dev-{i:05d}" for i in range(count)]


def sample_identities(
    identity_sets: Sequence[npt.NDArray[np.int64]], samples: int, rng: np.random.Generator
) -> npt.NDArray[np.int64]:
    """[devices, samples]: each device's samples' identities, uniform over its own."""
    return np.stack([rng.choice(ids, size=samples) for ids in identity_sets]).astype(np.int64)


def make_devices(
    bank: FeatureBank, world: World, model_id: str, count: int, samples: int, seed: int
) -> list[Device]:
    """``count`` devices of ``model_id``, each with ``samples`` fresh samples of its vendor
    and identities (a feature model fitted on the bank's train rows, seeded by ``seed``)
    and its held-out bank rows for evaluation."""
    ids = device_ids(model_id, count)
    profiles = [world.device_profile(model_id, d) for d in ids]
    vendors = np.asarray([p.vendor for p in profiles], dtype=np.int64)
    fresh = FreshFeatures(bank, vendors=vendors, seed=seed)
    rng = np.random.default_rng([seed, count, samples])
    identities = sample_identities([p.identities for p in profiles], samples, rng)
    owners = np.repeat(np.arange(count, dtype=np.int64), samples)
    rows = fresh.draw(bank.model_index(model_id), owners, identities.ravel(), rng)
    rows = rows.reshape(count, samples)
    features = fresh.features(rows.ravel()).reshape(count, samples, -1)
    return [
        Device(
            d,
            p.vendor,
            p.identities,
            rows[i],
            features[i],
            identities[i].astype(np.int32),
            bank.held_out(model_id, p.vendor, p.identities),
        )
        for i, (d, p) in enumerate(zip(ids, profiles, strict=True))
    ]


def validation_mask(
    settings: Settings, model_id: str, devices: Sequence[Device]
) -> npt.NDArray[np.bool_]:
    """Which pushed samples (device order, then sample order) the trainer holds out for
    validation: its own rule over the samples' keys (whole validation devices and a share
    of the others' samples, :class:`pipeline.samples.ValidationRule`)."""
    from pipeline.samples import ValidationRule

    rule = ValidationRule(settings.val_fraction, settings.val_device_fraction)
    keys = [(d.device_id, int(s)) for d in devices for s in d.sample_ids]
    return rule.mask(model_id, keys)


def distinct_check(
    bank: FeatureBank, devices: Sequence[Device], validation: npt.NDArray[np.bool_]
) -> dict[str, int]:
    """:func:`distinct_report` of the task: the samples FedEx's trainer trains on, those
    it validates on (``validation``), and the test rows. FedAvg trains on both kinds of
    sample, so no copy among the samples and none of them in the test rows covers it."""
    pushed = np.concatenate([d.features for d in devices])
    test, _ = bank.take(np.concatenate([d.eval_rows for d in devices]))
    return distinct_report(pushed[~validation], pushed[validation], test)


class Evaluator:
    """Mean over devices of each device's held-out accuracy, for any head state; and the
    accuracy per vendor."""

    def __init__(self, bank: FeatureBank, devices: Sequence[Device]) -> None:
        kept = [d for d in devices if d.eval_rows.size]
        rows = np.concatenate([d.eval_rows for d in kept])
        self.owner = np.concatenate([np.full(d.eval_rows.size, i) for i, d in enumerate(kept)])
        features, labels = bank.take(rows)
        self.x = torch.as_tensor(features.astype(np.float32))
        self.y = labels
        self.domains = bank.domains[rows]
        self.devices = len(kept)
        self.head = new_head(bank.backbone, bank.cut, bank.num_classes)
        self.template = {k: v.detach().clone() for k, v in self.head.state_dict().items()}

    @torch.no_grad()
    def correct(self, tensors: Mapping[str, Any]) -> npt.NDArray[np.bool_]:
        """Whether the head of ``tensors`` gets each test row right."""
        state = dict(self.template)
        for name, value in tensors.items():
            if isinstance(value, torch.Tensor):
                state[name] = value.detach().to(torch.float32).clone()
            else:
                state[name] = torch.from_numpy(np.array(value, dtype=np.float32))
        self.head.load_state_dict(state)
        self.head.eval()
        return np.asarray(self.head(self.x).argmax(1).numpy() == self.y)

    def __call__(self, tensors: Mapping[str, Any]) -> float:
        correct = self.correct(tensors).astype(np.float64)
        hits = np.bincount(self.owner, weights=correct, minlength=self.devices)
        totals = np.bincount(self.owner, minlength=self.devices)
        return float((hits / totals).mean())

    def vendors(self, tensors: Mapping[str, Any]) -> dict[str, Any]:
        """:func:`vendor_report` of the head: per vendor, spread, variance, worst."""
        return vendor_report(self.correct(tensors), self.domains)


@dataclass(frozen=True, slots=True)
class Task:
    """What every seed shares: the bank, its world and the model."""

    bank: FeatureBank
    world: World
    model_id: str
