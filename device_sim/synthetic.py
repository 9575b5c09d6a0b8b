"""Small in-memory worlds for tests and benchmarks: a :class:`FeatureBank` of separable
freeze6-shaped features and device profiles drawn from it, built in milliseconds instead
of rendering and running a backbone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt

from device_sim.bank import FeatureBank
from pipeline.records import Backbone, Cut


def synthetic_bank(
    *,
    models: tuple[str, ...] = ("faces-1",),
    identities: int = 32,
    vendors: int = 4,
    train_per_cell: int = 4,
    held_out_per_cell: int = 2,
    backbone: Backbone = Backbone.MOBILENET_V2,
    cut: Cut = Cut.FREEZE6,
    seed: int = 0,
) -> FeatureBank:
    """An in-memory :class:`FeatureBank` of freeze6-shaped (512) features: every identity
    in the clean domain (pre-training) and through every vendor (devices), with
    ``held_out_per_cell`` held-out rows per (identity, domain). Deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    dim = 512
    per_cell = train_per_cell + held_out_per_cell
    domains = vendors + 1
    rows = len(models) * identities * domains * per_cell
    m, d, i, k = np.meshgrid(
        np.arange(len(models)),
        np.arange(domains),
        np.arange(identities),
        np.arange(per_cell),
        indexing="ij",
    )
    prototypes = rng.standard_normal((len(models), identities, dim)).astype(np.float32)
    shifts = 0.5 * rng.standard_normal((domains, dim)).astype(np.float32)
    features = (
        prototypes[m.ravel(), i.ravel()]
        + shifts[d.ravel()]
        + 0.7 * rng.standard_normal((rows, dim)).astype(np.float32)
    )
    everyone = list(range(identities))
    meta: dict[str, object] = {
        "spec": {"format": 1, "backbone": backbone.value, "cut": cut.value, "synthetic": True},
        "key": f"synthetic-{seed}",
        "models": list(models),
        "identities": {mid: [f"{mid}/id{j:04d}" for j in everyone] for mid in models},
        "pretrain_identities": {mid: everyone for mid in models},
        "device_identities": {mid: everyone for mid in models},
        "vendors": ["clean", *(f"vendor-{v}" for v in range(1, domains))],
        "num_classes": identities,
        "feature_shape": [dim],
        "content_sha256": "",
    }
    return FeatureBank(
        path=Path(f"synthetic-{seed}.safetensors"),
        meta=meta,
        features=features.astype(np.float16),
        labels=i.ravel().astype(np.int32),
        models=m.ravel().astype(np.int32),
        domains=d.ravel().astype(np.uint8),
        image_index=k.ravel().astype(np.int32),
        holdout=(k.ravel() >= train_per_cell),
        build_seconds=0.0,
    )


def random_devices(
    bank: FeatureBank,
    model_id: str,
    devices: int,
    *,
    seed: int = 0,
    per_device: tuple[int, int] = (3, 8),
) -> tuple[npt.NDArray[np.int64], list[npt.NDArray[np.int64]]]:
    """Vendors and identity sets of ``devices`` devices, like ``World.device_profile``
    (uniform vendor, a uniform subset of the device identities), vectorised."""
    rng = np.random.default_rng(seed)
    candidates = bank.device_identities(model_id)
    vendors = rng.choice(np.asarray(bank.vendor_domains, dtype=np.int64), devices)
    lo, hi = per_device
    sizes = np.minimum(rng.integers(lo, hi + 1, devices), candidates.size)
    order = np.argsort(rng.random((devices, candidates.size)), axis=1)[:, :hi]
    identities = [np.sort(candidates[order[j, : sizes[j]]]) for j in range(devices)]
    return vendors.astype(np.int64), identities
