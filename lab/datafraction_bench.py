"""``fedex bench datafraction``: the paper's Figure 4 — validation accuracy of the
personalised head against the fraction of additional user data it was retrained on.

The world is the demo's real feature bank (rendered faces through the pretrained
backbone), or with ``--scale S`` an expanded world sampled from a feature model fitted on
it (:mod:`device_sim.expansion`): ``--scale paper`` is the paper's 8,631 identities and
437,855 additional features, ``--scale 0.1`` a tenth of both. Per model and per seed:

1. the base head ``v0`` is :func:`device_sim.heads.train_base_head` (clean images of the
   pre-training identities);
2. a fixed validation set is set aside from the devices' training rows (the trainer's
   fixed per-model validation set: never trained on by any arm);
3. the remaining device training rows (every vendor's camera) are shuffled once with the
   seed, and fraction ``f`` takes the first ``round(f·n)`` of them (nested: 5% holds 2%);
4. the head is retrained from ``v0`` (:func:`device_sim.heads.fit_head`, one recipe) in
   the arms :data:`ARMS`: ``user`` (the user data alone), ``pretrain+user`` (with the
   pre-training data), ``system`` (what the product ships: the ``user`` head only where it
   beats the champion ``v0`` on the fixed validation set by the trainer's margin, else
   ``v0``) and ``user+swa`` (the ``user`` recipe with dense weight averaging, the
   server-side mitigation of vendor heterogeneity);
5. accuracy is measured on the devices' held-out rows (never trained on), overall and per
   vendor (spread = best - worst vendor), and on the pre-training identities' clean
   held-out rows (how much the head forgets).

At 0% nothing is retrained: the point is ``v0`` itself. Seeds give mean ± spread.
"""

from __future__ import annotations

import copy
import math
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from device_sim.bank import FeatureBank
from device_sim.heads import fit_head, new_head, train_base_head
from device_sim.images import CLEAN_DOMAIN
from lab.bench_banks import expanded_bank, load_bank
from pipeline.head_loop import predict
from pipeline.zoo import load_head_state

#: Fractions of the additional user data (the paper's Figure 4 x axis).
FRACTIONS: Final = (0.0, 0.02, 0.05, 0.10, 0.25, 0.50, 1.0)
#: The arms (see the module docstring).
ARM_USER: Final = "user"
ARM_MIXED: Final = "pretrain+user"
ARM_SYSTEM: Final = "system"
ARM_SWA: Final = "user+swa"
ARMS: Final = (ARM_USER, ARM_MIXED, ARM_SYSTEM, ARM_SWA)
#: The fixed validation set: this share of the device training rows, at most VAL_MAX.
VAL_FRACTION: Final = 0.05
VAL_MAX: Final = 2048
#: The system arm promotes only a challenger this much better than v0 on validation.
PROMOTE_MARGIN: Final = 0.005
#: Where dense weight averaging starts (fraction of the steps) in the ``user+swa`` arm.
SWA_START: Final = 0.5


@dataclass(frozen=True, slots=True)
class Recipe:
    """How every head is trained: the base head and each retraining alike."""

    epochs: int = 10
    lr: float = 3e-3
    weight_decay: float = 1e-4
    batch_size: int = 128
    swa_start: float | None = None

    def fit_kwargs(self, seed: int) -> dict[str, Any]:
        """The recipe as the keyword arguments of ``fit_head``."""
        return {**asdict(self), "seed": seed}

    def base_kwargs(self, seed: int) -> dict[str, Any]:
        """... and of ``train_base_head`` (the base head is never weight-averaged)."""
        kwargs = self.fit_kwargs(seed)
        del kwargs["swa_start"]
        return kwargs


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
    #: Accuracy per vendor domain (JSON keys are strings), best - worst, the worst vendor.
    vendor_accuracy: dict[str, float] = field(default_factory=dict)
    vendor_spread: float = math.nan
    worst_vendor: int = -1
    #: Accuracy on the fixed validation set; for the system arm whether it promoted.
    val_accuracy: float = math.nan
    promoted: bool | None = None


@dataclass(frozen=True)
class Sweep:
    """All points of one model and what they were measured on."""

    model_id: str
    user_train_rows: int
    device_val_rows: int
    fixed_val_rows: int
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
    """Per arm, per fraction: device and pre-training accuracy, the vendor spread (best -
    worst vendor) and the worst vendor's accuracy over seeds, each seed's value first
    averaged over the models (every model weighs the same); for the system arm how many
    (model, seed) points promoted."""
    out: dict[str, list[dict[str, Any]]] = {}
    arms = list(dict.fromkeys(p.arm for p in points))
    fractions = sorted({p.fraction for p in points})

    def over_seeds(chosen: list[Point], value: Callable[[Point], float]) -> dict[str, Any]:
        seeds = sorted({p.seed for p in chosen})
        return spread([statistics.fmean(value(p) for p in chosen if p.seed == s) for s in seeds])

    for arm in arms:
        rows = []
        for f in fractions:
            chosen = [p for p in points if p.arm == arm and p.fraction == f]
            row: dict[str, Any] = {
                "fraction": f,
                "user_samples": _int_if_whole(statistics.fmean(p.user_samples for p in chosen)),
                "device_accuracy": over_seeds(chosen, lambda p: p.device_accuracy),
                "pretrain_accuracy": over_seeds(chosen, lambda p: p.pretrain_accuracy),
            }
            if all(p.vendor_accuracy for p in chosen):
                row["vendor_spread"] = over_seeds(chosen, lambda p: p.vendor_spread)
                row["worst_vendor_accuracy"] = over_seeds(
                    chosen, lambda p: min(p.vendor_accuracy.values())
                )
            if arm == ARM_SYSTEM:
                decided = [p.promoted for p in chosen if p.promoted is not None]
                row["promoted"] = f"{sum(decided)}/{len(decided)}"
            rows.append(row)
        out[arm] = rows
    return out


def _int_if_whole(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


# ------------------------------------------------------------------------ the sweep


def fixed_validation(
    rows: npt.NDArray[np.int64], *, fraction: float = VAL_FRACTION, cap: int = VAL_MAX
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """The fixed validation rows (the same for every seed and arm) and the rest."""
    order = np.random.default_rng(0x5A1).permutation(rows)
    size = min(cap, max(1, round(fraction * rows.size))) if rows.size > 1 else 0
    return np.sort(order[:size]), np.sort(order[size:])


def promotes(challenger: float, champion: float, margin: float = PROMOTE_MARGIN) -> bool:
    """The trainer's rule: a tie is not a win."""
    return challenger > champion + margin


def vendor_summary(
    correct: npt.NDArray[np.bool_], domains: npt.NDArray[np.integer[Any]]
) -> tuple[dict[str, float], float, int]:
    """Accuracy per vendor, best - worst vendor, and the worst vendor."""
    per = {str(int(v)): float(correct[domains == v].mean()) for v in np.unique(domains).tolist()}
    if not per:
        return {}, math.nan, -1
    worst = min(per, key=lambda v: per[v])
    return per, max(per.values()) - per[worst], int(worst)


@dataclass(frozen=True)
class _EvalSet:
    """Features, labels and camera domains of one evaluation set."""

    x: npt.NDArray[np.float16]
    y: npt.NDArray[np.int32]
    domains: npt.NDArray[np.uint8]

    @classmethod
    def of(cls, bank: FeatureBank, rows: npt.NDArray[np.int64]) -> _EvalSet:
        x, y = bank.take(rows)
        return cls(x, y, bank.domains[rows])

    def correct(self, head: Any) -> npt.NDArray[np.bool_]:
        predicted = predict(head, self.x).numpy()
        return np.asarray(predicted == self.y.astype(np.int64))


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
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise ValueError(f"unknown arms {unknown}; use {', '.join(ARMS)}")
    sets = _SweepSets.of(bank, model_id)
    counts = fraction_counts(int(sets.user_rows.size), fractions)
    sweep = sets.sweep(model_id)
    for seed in seeds:
        run = _SeedRun.start(bank, model_id, sets, recipe, seed)
        for f, count, subset in zip(
            fractions, counts, user_subsets(sets.user_rows, counts, seed), strict=True
        ):
            trained: dict[str, tuple[Any, int, float]] = {}  # arm → head, samples, seconds
            for arm in arms:
                started = time.perf_counter()
                head, samples, promoted = run.arm_head(arm, subset, count, trained)
                sweep.points.append(run.point(arm, f, count, head, samples, promoted, started))
            log(
                f"{model_id} seed {seed} {f:.0%}: "
                + ", ".join(f"{p.arm} {p.device_accuracy:.3f}" for p in sweep.points[-len(arms) :])
            )
    return sweep


@dataclass(frozen=True)
class _SweepSets:
    """The rows one model's sweep trains on (the user rows left after the fixed validation
    rows, the clean pre-training rows) and the sets it measures on (the devices' held-out
    rows, the fixed validation rows, the pre-training identities' clean held-out rows)."""

    user_rows: npt.NDArray[np.int64]
    pre_rows: npt.NDArray[np.int64]
    device_val: _EvalSet
    val: _EvalSet
    pre_val: _EvalSet

    @classmethod
    def of(cls, bank: FeatureBank, model_id: str) -> _SweepSets:
        vendors = list(bank.vendor_domains)
        pretrain_ids = bank.pretrain_identities(model_id)
        fixed_val, user_rows = fixed_validation(
            bank.select(model_id, domains=vendors, holdout=False)
        )
        device_val = _EvalSet.of(bank, bank.select(model_id, domains=vendors, holdout=True))
        val = _EvalSet.of(bank, fixed_val)
        pre_rows = bank.select(
            model_id, domains=[CLEAN_DOMAIN], identities=pretrain_ids, holdout=False
        )
        pre_val = _EvalSet.of(
            bank,
            bank.select(model_id, domains=[CLEAN_DOMAIN], identities=pretrain_ids, holdout=True),
        )
        return cls(user_rows, pre_rows, device_val, val, pre_val)

    def sweep(self, model_id: str) -> Sweep:
        """An empty sweep of ``model_id`` that records these sets' sizes."""
        return Sweep(
            model_id=model_id,
            user_train_rows=int(self.user_rows.size),
            device_val_rows=int(self.device_val.y.size),
            fixed_val_rows=int(self.val.y.size),
            pretrain_train_rows=int(self.pre_rows.size),
            pretrain_val_rows=int(self.pre_val.y.size),
        )


@dataclass(frozen=True)
class _SeedRun:
    """One seed of one model's sweep: its base head ``v0`` (and v0's accuracy on the fixed
    validation rows, the champion the system arm must beat); trains each arm's head from
    ``v0`` and measures it."""

    bank: FeatureBank
    model_id: str
    sets: _SweepSets
    recipe: Recipe
    seed: int
    v0: Any
    v0_val: float

    @classmethod
    def start(
        cls, bank: FeatureBank, model_id: str, sets: _SweepSets, recipe: Recipe, seed: int
    ) -> _SeedRun:
        base = train_base_head(bank, model_id, **recipe.base_kwargs(seed))
        v0 = new_head(bank.backbone, bank.cut, bank.num_classes, seed=seed)
        load_head_state(v0, base.state_dict)
        v0.eval()
        v0_val = float(sets.val.correct(v0).mean()) if sets.val.y.size else math.nan
        return cls(bank, model_id, sets, recipe, seed, v0, v0_val)

    def arm_head(
        self,
        arm: str,
        subset: npt.NDArray[np.int64],
        count: int,
        trained: dict[str, tuple[Any, int, float]],
    ) -> tuple[Any, int, bool | None]:
        """The head ``arm`` ships at this fraction (``subset``, ``count`` user rows), the
        samples it trained on and, for the system arm, whether it promoted. ``trained`` is
        shared by the fraction's arms: the system arm ships the user arm's head (trained
        once) only when it beats ``v0`` by the trainer's rule."""
        v0, bank, recipe, seed = self.v0, self.bank, self.recipe, self.seed
        head, samples, promoted = v0, 0, None
        rows = subset if arm != ARM_MIXED else np.concatenate([self.sets.pre_rows, subset])
        if arm == ARM_SYSTEM:
            user = trained.get(ARM_USER) or _fit(v0, bank, subset, recipe, seed)
            trained.setdefault(ARM_USER, user)
            head, samples = user[0], user[1]
            if head is not v0:
                promoted = promotes(float(self.sets.val.correct(head).mean()), self.v0_val)
                head = head if promoted else v0
        elif count > 0 and rows.size >= 2:
            swa = SWA_START if arm == ARM_SWA else None
            trained[arm] = _fit(v0, bank, rows, replace(recipe, swa_start=swa), seed)
            head, samples = trained[arm][0], trained[arm][1]
        return head, samples, promoted

    def point(
        self,
        arm: str,
        fraction: float,
        count: int,
        head: Any,
        samples: int,
        promoted: bool | None,
        started: float,
    ) -> Point:
        """What ``head`` scores on every set; ``seconds`` runs from ``started``, so it
        covers training the head and measuring it."""
        sets = self.sets
        correct = sets.device_val.correct(head)
        per_vendor, vendor_gap, worst = vendor_summary(correct, sets.device_val.domains)
        return Point(
            model_id=self.model_id,
            seed=self.seed,
            arm=arm,
            fraction=fraction,
            user_samples=count,
            train_samples=samples,
            device_accuracy=float(correct.mean()),
            pretrain_accuracy=float(sets.pre_val.correct(head).mean()),
            seconds=time.perf_counter() - started,
            vendor_accuracy=per_vendor,
            vendor_spread=vendor_gap,
            worst_vendor=worst,
            val_accuracy=float(sets.val.correct(head).mean()) if sets.val.y.size else math.nan,
            promoted=promoted,
        )


def _fit(
    v0: Any, bank: FeatureBank, rows: npt.NDArray[np.int64], recipe: Recipe, seed: int
) -> tuple[Any, int, float]:
    """A head retrained from ``v0`` on ``rows`` (``v0`` itself when there are < 2)."""
    if rows.size < 2:
        return v0, 0, 0.0
    started = time.perf_counter()
    head = copy.deepcopy(v0)
    fit_head(head, *bank.take(rows), **recipe.fit_kwargs(seed))
    return head, int(rows.size), time.perf_counter() - started


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


def run_datafraction_bench(
    *,
    bank_dir: Path,
    home: Path | None = None,
    config: str = "default",
    scale: float | None = None,
    seeds: int = 5,
    epochs: int = 10,
    arms: Sequence[str] = ARMS,
    out: Path | None = None,
    plot: Path | None = Path("docs/img/datafraction.png"),
) -> dict[str, Any]:
    """``fedex bench datafraction``: sweep, print the curve, write JSON (and the plot)."""
    from lab.benchio import write_result

    started = time.perf_counter()
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    bank, bank_doc = _bench_bank(config, bank_dir, home, scale, started)
    doc = run_sweeps(bank, seeds=range(seeds), arms=arms, recipe=Recipe(epochs=epochs), log=print)
    doc.update(
        config=config,
        scale=scale,
        bank=bank_doc,
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
    _print_curves(doc, seeds)
    print(f"wrote {path}")
    if plot is not None:
        from lab.report_plots import plot_datafraction

        plot_datafraction({"benchmark": "datafraction", **doc}, plot)
        print(f"wrote {plot}")
    return doc


def _bench_bank(
    config: str, bank_dir: Path, home: Path | None, scale: float | None, started: float
) -> tuple[FeatureBank, dict[str, Any]]:
    """The bank the bench sweeps (the real one, or the expanded world at ``scale`` fitted on
    it) and its record for the result; its time counts from ``started``."""
    bank = real = load_bank(config, bank_dir, home=home)
    fitted: dict[str, Any] | None = None
    if scale is not None:
        bank, model = expanded_bank(real, scale)
        fitted = model.summary()
    bank_seconds = time.perf_counter() - started
    print(
        f"bank {bank.path.name}: {len(bank):,} features {bank.feature_shape}, "
        f"{bank.num_classes:,} identities "
        f"({'cache' if bank.from_cache else f'ready in {bank_seconds:.0f} s'})"
    )
    return bank, {
        "file": bank.path.name,
        "key": bank.key,
        "backbone": bank.backbone.value,
        "cut": bank.cut.value,
        "world": real.spec.get("world"),
        "expansion": bank.spec.get("expansion"),
        "fitted_on": real.path.name if scale is not None else None,
        "feature_model": fitted,
        "identities": bank.num_classes,
        "weights_sha256": real.spec.get("weights_sha256"),
        "from_cache": bank.from_cache,
        "seconds": round(bank_seconds, 2),
    }


def _print_curves(doc: Mapping[str, Any], seeds: int) -> None:
    """One table per arm: its accuracy curve over the fractions."""
    from pipeline.tables import print_table

    for arm, rows in doc["curves"].items():
        print_table(
            f"accuracy vs fraction of additional user data — retrained on {arm} "
            f"({seeds} seeds, mean ± std)",
            [
                "fraction",
                "user samples",
                "device acc",
                "± std",
                "vendor spread",
                "worst vendor",
                "pre-train acc",
            ],
            [
                [
                    f"{r['fraction']:.0%}",
                    r["user_samples"],
                    r["device_accuracy"]["mean"],
                    r["device_accuracy"]["std"],
                    r.get("vendor_spread", {}).get("mean"),
                    r.get("worst_vendor_accuracy", {}).get("mean"),
                    r["pretrain_accuracy"]["mean"],
                ]
                for r in rows
            ],
        )
