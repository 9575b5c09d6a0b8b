"""``fedex bench expansion``: how faithful the feature-space expansion is.

Figure 4 at the paper's scale runs on a world sampled from a feature model fitted on real
backbone features (:mod:`device_sim.expansion`). Two checks, per model of the real bank
and per seed, each through the Figure 4 sweep (:func:`lab.datafraction_bench.sweep_model`,
arm ``user``, at 0%, 10% and 100% of the user data):

1. **Fitted identities** — the *twin* of the real bank (every train row, clean and
   vendor, replaced by a draw of its cell; held-out rows kept real): a base head and a
   retrained head learnt from sampled features, tested on held-out **real** features,
   against the same heads learnt from the real features. This measures the within-cell
   model (one Gaussian per cell around its real centre).
2. **New identities** — a world of the same size (identities, rows per cell) whose
   identities are all new draws of the model: its own v0 and retrained accuracy on its own
   held-out rows, against the real world's. This measures whether the between-identity,
   camera and interaction parts make a world as hard as the real one (there are no real
   features of new identities to test on, so nothing stronger can be measured).

What neither can show: how real faces of thousands of identities would crowd the space
(new identities live in the span the fitted ones vary in, plus isotropic noise).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from device_sim.bank import FeatureBank
from device_sim.expansion import ExpansionConfig, expand, twin
from device_sim.feature_model import FeatureModel, fit
from device_sim.images import CLEAN_DOMAIN
from lab.bench_banks import load_bank
from lab.datafraction_bench import ARM_USER, Recipe, sweep_model

FRACTIONS = (0.0, 0.1, 1.0)


def same_size(bank: FeatureBank, model_id: str, seed: int) -> ExpansionConfig:
    """An expansion with the real world's identities and rows per cell."""
    vendors = list(bank.vendor_domains)
    pretrain = bank.pretrain_identities(model_id)
    device_train = bank.select(model_id, domains=vendors, holdout=False)
    device_held = bank.select(model_id, domains=vendors, holdout=True)
    clean = [CLEAN_DOMAIN]
    clean_train = bank.select(model_id, domains=clean, identities=pretrain, holdout=False)
    clean_held = bank.select(model_id, domains=clean, identities=pretrain, holdout=True)
    cells = max(1, bank.device_identities(model_id).size * len(vendors))
    return ExpansionConfig(
        seed=seed,
        model_id=model_id,
        identities=bank.num_classes,
        device_rows=int(device_train.size),
        device_holdout=max(1, round(device_held.size / cells)),
        pretrain_fraction=pretrain.size / bank.num_classes,
        pretrain_rows=max(1, round(clean_train.size / max(1, pretrain.size))),
        pretrain_holdout=max(1, round(clean_held.size / max(1, pretrain.size))),
    )


def fitted_model(bank: FeatureBank, model_id: str) -> FeatureModel:
    rows = bank.select(model_id, holdout=False)
    return fit(bank.features[rows], bank.labels[rows], bank.domains[rows])


def _accuracies(bank: FeatureBank, model_id: str, seed: int, recipe: Recipe) -> dict[str, float]:
    sweep = sweep_model(
        bank, model_id, seeds=[seed], fractions=FRACTIONS, arms=(ARM_USER,), recipe=recipe
    )
    return {f"{p.fraction:g}": p.device_accuracy for p in sweep.points}


def measure(
    bank: FeatureBank, *, seeds: Sequence[int], recipe: Recipe | None = None
) -> dict[str, Any]:
    """Every (model, seed): accuracy at each fraction of the real, twin and new-identity
    worlds, and the gaps (sampled - real, in accuracy points)."""
    recipe = recipe or Recipe()
    rows: list[dict[str, Any]] = []
    summaries = {}
    for model_id in bank.model_ids:
        model = fitted_model(bank, model_id)
        summaries[model_id] = model.summary()
        for seed in seeds:
            started = time.perf_counter()
            real = _accuracies(bank, model_id, seed, recipe)
            copy = _accuracies(twin(bank, model, model_id, seed), model_id, seed, recipe)
            world = expand(
                model,
                same_size(bank, model_id, seed),
                backbone=bank.backbone,
                cut=bank.cut,
                source=bank.key,
            )
            new = _accuracies(world, world.model_ids[0], seed, recipe)
            rows.append(
                {
                    "model_id": model_id,
                    "seed": seed,
                    "real": real,
                    "twin_tested_on_real": copy,
                    "new_identities": new,
                    "seconds": round(time.perf_counter() - started, 2),
                }
            )
    return {"fractions": list(FRACTIONS), "rows": rows, "summary": summarise(rows)} | {
        "feature_models": summaries
    }


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per fraction: mean accuracy of each world and the mean gap to the real one, with
    the largest gap over (model, seed)."""
    out: dict[str, Any] = {}
    for f in (f"{f:g}" for f in FRACTIONS):
        entry: dict[str, Any] = {"real": statistics.fmean(r["real"][f] for r in rows)}
        for world in ("twin_tested_on_real", "new_identities"):
            gaps = [r[world][f] - r["real"][f] for r in rows]
            entry[world] = statistics.fmean(r[world][f] for r in rows)
            entry[f"{world}_gap"] = statistics.fmean(gaps)
            entry[f"{world}_max_abs_gap"] = max(abs(g) for g in gaps)
        out[f] = entry
    return out


def run_expansion_bench(
    *,
    bank_dir: Path,
    home: Path | None,
    config: str = "default",
    seeds: int = 3,
    epochs: int = 10,
    out: Path | None = None,
) -> dict[str, Any]:
    """``fedex bench expansion``: measure, print the table, write the JSON."""
    from lab.benchio import write_result
    from pipeline.tables import print_table

    started = time.perf_counter()
    bank = load_bank(config, bank_dir, home=home)
    doc = measure(bank, seeds=range(seeds), recipe=Recipe(epochs=epochs))
    doc.update(
        config=config,
        bank={
            "file": bank.path.name,
            "key": bank.key,
            "rows": len(bank),
            "identities": bank.num_classes,
            "weights_sha256": bank.spec.get("weights_sha256"),
        },
        recipe={"epochs": epochs},
        seconds=round(time.perf_counter() - started, 2),
        held_out=(
            "twin: the real bank's held-out rows (never sampled, never trained on); new "
            "identities: the sampled world's own held-out rows (a separate random stream)"
        ),
    )
    path = write_result("expansion", doc, out)
    print_table(
        f"feature-space expansion fidelity ({len(bank.model_ids)} models × {seeds} seeds; "
        "device held-out accuracy, gap = sampled - real)",
        ["user data", "real", "twin (on real)", "gap", "new identities", "gap"],
        [
            [
                f"{float(f):.0%}",
                e["real"],
                e["twin_tested_on_real"],
                e["twin_tested_on_real_gap"],
                e["new_identities"],
                e["new_identities_gap"],
            ]
            for f, e in doc["summary"].items()
        ],
    )
    print(f"wrote {path}")
    return doc
