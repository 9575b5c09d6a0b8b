"""``fedex bench datafraction``: the paper's Figure 4 — validation accuracy of the
personalised head against the fraction of additional user data it was retrained on.

Per model of the world's feature bank and per seed:

1. the base head ``v0`` is :func:`device_sim.heads.train_base_head` (clean images of the
   pre-training identities);
2. the devices' training rows (every vendor's camera, train side) are shuffled once with
   the seed, and fraction ``f`` takes the first ``round(f·n)`` of them, so the sets are
   nested: 5% holds the 2%;
3. the head is retrained from ``v0`` (:func:`device_sim.heads.fit_head`, the same recipe
   for every fraction) in two arms: on the user data alone (what the trainer does:
   warm start on the feature log) and on the pre-training data plus the user data;
4. accuracy is measured on the devices' held-out rows (never trained on), and on the
   pre-training identities' clean held-out rows (how much the head forgets).

At 0% nothing is retrained: the point is ``v0`` itself. Seeds give mean ± spread.
"""

from __future__ import annotations

import copy
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from device_sim.bank import DEFAULT_BACKBONE, DEFAULT_CUT, FeatureBank, build_bank
from device_sim.heads import fit_head, head_accuracy, new_head, train_base_head
from device_sim.images import CLEAN_DOMAIN
from device_sim.world import World, WorldConfig
from pipeline.records import Backbone, Cut
from pipeline.zoo import load_head_state

#: Fractions of the additional user data (the paper's Figure 4 x axis).
FRACTIONS: Final = (0.0, 0.02, 0.05, 0.10, 0.25, 0.50, 1.0)
#: Training sets of the retrained head: the user data alone, or with the pre-training data.
ARM_USER: Final = "user"
ARM_MIXED: Final = "pretrain+user"
ARMS: Final = (ARM_USER, ARM_MIXED)

#: A world small enough for tests and smoke runs (MobileNetV2 bank in seconds).
SMALL_WORLD: Final = WorldConfig(
    seed=0,
    models=("faces-1",),
    identities=8,
    pretrain_images=4,
    device_images=4,
    vendors=2,
    identities_per_device=(2, 4),
)
CONFIGS: Final[dict[str, tuple[WorldConfig, Backbone, Cut]]] = {
    "default": (WorldConfig(), DEFAULT_BACKBONE, DEFAULT_CUT),
    "small": (SMALL_WORLD, Backbone.MOBILENET_V2, Cut.FREEZE6),
}


@dataclass(frozen=True, slots=True)
class Recipe:
    """How every head is trained: the base head and each retraining alike."""

    epochs: int = 30
    lr: float = 3e-3
    weight_decay: float = 1e-4
    batch_size: int = 128

    def fit_kwargs(self, seed: int) -> dict[str, Any]:
        """The recipe as the keyword arguments of ``train_base_head`` and ``fit_head``."""
        return {**asdict(self), "seed": seed}


@dataclass(frozen=True, slots=True)
class Point:
    """One retrained head: a model, seed, arm and fraction, and what it scored."""

    model_id: str
    seed: int
    arm: str
    fraction: float
    user_samples: int
    train_samples: int
    device_accuracy: float
    pretrain_accuracy: float
    seconds: float


@dataclass(frozen=True)
class Sweep:
    """All points of one model and what they were measured on."""

    model_id: str
    user_train_rows: int
    device_val_rows: int
    pretrain_train_rows: int
    pretrain_val_rows: int
    points: list[Point] = field(default_factory=list)


# ------------------------------------------------------------------------ pure pieces


def fraction_counts(n: int, fractions: Sequence[float] = FRACTIONS) -> list[int]:
    """Rows taken at each fraction of ``n`` (rounded half up; 0% is 0, 100% is ``n``)."""
    if n < 0:
        raise ValueError(f"n must be ≥ 0, got {n}")
    counts = []
    for f in fractions:
        if not 0.0 <= f <= 1.0:
            raise ValueError(f"fractions must be in [0, 1], got {f}")
        counts.append(min(n, math.floor(f * n + 0.5)))
    return counts


def user_subsets(
    rows: npt.NDArray[np.int64], counts: Sequence[int], seed: int
) -> list[npt.NDArray[np.int64]]:
    """Nested subsets: one seeded shuffle of ``rows``, the first ``count`` of it each."""
    order = np.random.default_rng(seed).permutation(rows)
    return [order[:count] for count in counts]


def spread(values: Sequence[float]) -> dict[str, float | int]:
    """Mean, sample standard deviation (0 for one value), min and max."""
    if not values:
        raise ValueError("no values")
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def curves(points: Sequence[Point]) -> dict[str, list[dict[str, Any]]]:
    """Per arm, per fraction: device and pre-training accuracy over seeds, each seed's
    value first averaged over the models (every model weighs the same)."""
    out: dict[str, list[dict[str, Any]]] = {}
    arms = list(dict.fromkeys(p.arm for p in points))
    fractions = sorted({p.fraction for p in points})
    for arm in arms:
        rows = []
        for f in fractions:
            chosen = [p for p in points if p.arm == arm and p.fraction == f]
            seeds = sorted({p.seed for p in chosen})
            device = [
                statistics.fmean(p.device_accuracy for p in chosen if p.seed == s) for s in seeds
            ]
            pretrain = [
                statistics.fmean(p.pretrain_accuracy for p in chosen if p.seed == s) for s in seeds
            ]
            rows.append(
                {
                    "fraction": f,
                    "user_samples": _int_if_whole(statistics.fmean(p.user_samples for p in chosen)),
                    "device_accuracy": spread(device),
                    "pretrain_accuracy": spread(pretrain),
                }
            )
        out[arm] = rows
    return out


def _int_if_whole(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


# ------------------------------------------------------------------------ the sweep


def sweep_model(
    bank: FeatureBank,
    model_id: str,
    *,
    seeds: Sequence[int],
    fractions: Sequence[float] = FRACTIONS,
    arms: Sequence[str] = ARMS,
    recipe: Recipe = Recipe(),
    log: Callable[[str], None] = lambda _: None,
) -> Sweep:
    """Every (seed, arm, fraction) point of ``model_id`` (see the module docstring)."""
    vendors = list(bank.vendor_domains)
    pretrain_ids = bank.pretrain_identities(model_id)
    user_rows = bank.select(model_id, domains=vendors, holdout=False)
    device_val = bank.take(bank.select(model_id, domains=vendors, holdout=True))
    pre_rows = bank.select(model_id, domains=[CLEAN_DOMAIN], identities=pretrain_ids, holdout=False)
    pre_val = bank.take(
        bank.select(model_id, domains=[CLEAN_DOMAIN], identities=pretrain_ids, holdout=True)
    )
    counts = fraction_counts(int(user_rows.size), fractions)
    sweep = Sweep(
        model_id=model_id,
        user_train_rows=int(user_rows.size),
        device_val_rows=int(device_val[1].size),
        pretrain_train_rows=int(pre_rows.size),
        pretrain_val_rows=int(pre_val[1].size),
    )
    for seed in seeds:
        base = train_base_head(bank, model_id, **recipe.fit_kwargs(seed))
        v0 = new_head(bank.backbone, bank.cut, bank.num_classes, seed=seed)
        load_head_state(v0, base.state_dict)
        v0.eval()
        v0_device, v0_pretrain = head_accuracy(v0, *device_val), head_accuracy(v0, *pre_val)
        for f, count, subset in zip(
            fractions, counts, user_subsets(user_rows, counts, seed), strict=True
        ):
            for arm in arms:
                rows = subset if arm == ARM_USER else np.concatenate([pre_rows, subset])
                started = time.perf_counter()
                if count == 0 or rows.size < 2:
                    device_acc, pretrain_acc, trained = v0_device, v0_pretrain, 0
                else:
                    head = copy.deepcopy(v0)
                    fit_head(head, *bank.take(rows), **recipe.fit_kwargs(seed))
                    device_acc = head_accuracy(head, *device_val)
                    pretrain_acc = head_accuracy(head, *pre_val)
                    trained = int(rows.size)
                sweep.points.append(
                    Point(
                        model_id=model_id,
                        seed=seed,
                        arm=arm,
                        fraction=f,
                        user_samples=count,
                        train_samples=trained,
                        device_accuracy=device_acc,
                        pretrain_accuracy=pretrain_acc,
                        seconds=time.perf_counter() - started,
                    )
                )
        log(f"{model_id} seed {seed}: v0 {v0_device:.3f} on device data")
    return sweep


def run_sweeps(
    bank: FeatureBank,
    *,
    seeds: Sequence[int],
    models: Sequence[str] | None = None,
    fractions: Sequence[float] = FRACTIONS,
    arms: Sequence[str] = ARMS,
    recipe: Recipe = Recipe(),
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """The sweeps of ``models`` (default every model of the bank) and their curves, as
    the JSON document of the bench (without machine info)."""
    sweeps = [
        sweep_model(bank, m, seeds=seeds, fractions=fractions, arms=arms, recipe=recipe, log=log)
        for m in (models or bank.model_ids)
    ]
    points = [p for s in sweeps for p in s.points]
    return {
        "fractions": list(fractions),
        "seeds": list(seeds),
        "arms": list(arms),
        "recipe": asdict(recipe),
        "models": [{k: v for k, v in asdict(s).items() if k != "points"} for s in sweeps],
        "curves": curves(points),
        "points": [asdict(p) for p in points],
    }


# ------------------------------------------------------------------------ the command


def load_bank(config: str, bank_dir: Path, *, seed: int = 0) -> FeatureBank:
    """The bank of a named configuration: found in ``bank_dir`` or built there."""
    try:
        world_config, backbone, cut = CONFIGS[config]
    except KeyError:
        raise ValueError(f"unknown config {config!r}; use one of {', '.join(CONFIGS)}") from None
    world = World(replace(world_config, seed=seed))
    return build_bank(world, backbone=backbone, cut=cut, out=bank_dir, progress=True)


def run_datafraction_bench(
    *,
    bank_dir: Path,
    config: str = "default",
    seeds: int = 5,
    epochs: int = 30,
    out: Path | None = None,
    plot: Path | None = Path("docs/img/datafraction.png"),
) -> dict[str, Any]:
    """``fedex bench datafraction``: sweep, print the curve, write JSON (and the plot)."""
    from lab.benchio import write_result
    from pipeline.tables import print_table

    started = time.perf_counter()
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    bank = load_bank(config, bank_dir)
    bank_seconds = time.perf_counter() - started
    print(
        f"bank {bank.path.name}: {len(bank):,} features {bank.feature_shape} "
        f"({'cache' if bank.from_cache else f'built in {bank.build_seconds:.0f} s'})"
    )
    doc = run_sweeps(bank, seeds=range(seeds), recipe=Recipe(epochs=epochs), log=print)
    doc.update(
        config=config,
        bank={
            "file": bank.path.name,
            "key": bank.key,
            "backbone": bank.backbone.value,
            "cut": bank.cut.value,
            "world": bank.spec["world"],
            "from_cache": bank.from_cache,
            "seconds": round(bank_seconds, 2),
        },
        validation=(
            "device accuracy: held-out rows of every device identity through every vendor "
            "camera (never trained on); pre-training accuracy: clean held-out rows of the "
            "pre-training identities"
        ),
        seconds=round(time.perf_counter() - started, 2),
        loadavg_start=[round(v, 2) for v in load_start] if load_start else None,
        loadavg_end=[round(v, 2) for v in os.getloadavg()] if load_start else None,
    )
    path = write_result("datafraction", doc, out)
    for arm, rows in doc["curves"].items():
        print_table(
            f"accuracy vs fraction of additional user data — retrained on {arm} "
            f"({seeds} seeds, mean ± std)",
            ["fraction", "user samples", "device acc", "± std", "pre-train acc"],
            [
                [
                    f"{r['fraction']:.0%}",
                    r["user_samples"],
                    r["device_accuracy"]["mean"],
                    r["device_accuracy"]["std"],
                    r["pretrain_accuracy"]["mean"],
                ]
                for r in rows
            ],
        )
    print(f"wrote {path}")
    if plot is not None:
        from lab.report_plots import plot_datafraction

        plot_datafraction({"benchmark": "datafraction", **doc}, plot)
        print(f"wrote {plot}")
    return doc
