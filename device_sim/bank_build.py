"""``fedex bank build``: build (or find) the default world's bank, say what it holds, and
report each model's base head."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from device_sim.bank import DEFAULT_BACKBONE, DEFAULT_CUT, FeatureBank, build_bank
from device_sim.world import World, WorldConfig
from pipeline.records import Backbone, Cut


def run_bank_build(
    *,
    out: Path,
    cut: Cut | str = DEFAULT_CUT,
    backbone: Backbone | str = DEFAULT_BACKBONE,
    images: Path | None = None,
    weights: Path | None = None,
    seed: int = 0,
    batch_size: int = 32,
    base_report: bool = True,
    config: WorldConfig | None = None,
) -> FeatureBank:
    """``fedex bank build``: build (or find) the bank of the default world with ``seed`` in
    ``out``, with a progress bar, and print what it holds; with ``base_report``, train each
    model's base head and print its accuracy on pre-training and on device data."""
    from rich.console import Console
    from rich.table import Table

    from device_sim.heads import train_base_head

    console = Console()
    world = World(replace(config or WorldConfig(), seed=seed))
    started = time.perf_counter()
    bank = build_bank(
        world,
        backbone=backbone,
        cut=cut,
        weights=weights,
        images_dir=images,
        out=out,
        batch_size=batch_size,
        progress=True,
    )
    seconds = time.perf_counter() - started
    how = "found in cache" if bank.from_cache else f"built in {bank.build_seconds:.1f} s"
    console.print(
        f"[bold]bank[/bold] {bank.path} ({bank.path.stat().st_size / 1e6:.1f} MB): "
        f"{len(bank):,} features {bank.feature_shape} of {bank.backbone} at {bank.cut}, "
        f"{len(bank.model_ids)} models x {bank.num_classes} identities, "
        f"{bank.num_domains - 1} vendors; {how} ({seconds:.1f} s), "
        f"content sha256 {bank.content_sha256[:16]}",
        highlight=False,
    )
    if base_report:
        table = Table(title="base head v0 (pre-training identities, clean domain)")
        for column in ("model", "pre-train val", "device", "seen ids", "novel ids", "per vendor"):
            table.add_column(column)
        for model_id in bank.model_ids:
            base = train_base_head(bank, model_id, weights=weights)
            table.add_row(
                model_id,
                f"{base.pretrain_val_accuracy:.3f}",
                f"{base.device_accuracy:.3f}",
                f"{base.seen_device_accuracy:.3f}",
                f"{base.novel_device_accuracy:.3f}",
                " ".join(f"{v}:{a:.2f}" for v, a in base.vendor_accuracy.items()),
            )
        console.print(table)
    return bank
