"""A fleet run's progress line, JSON summary, summary table, and the merge of shards.

The summary is plain JSON data (docs/fleet.md lists its fields). A shard run with
``per_device`` keeps its per-device columns so that :func:`merge_summaries` can combine
the shards of ``fedex devices --processes P`` exactly (sums, per-device distributions,
histogram percentiles).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
from rich.table import Table

from device_sim.accounting import COUNTERS, LogHistogram, distribution, merge_versions
from device_sim.devices import COMPUTE_TIERS
from device_sim.energy import EnergyModel
from pipeline.tables import fmt

if TYPE_CHECKING:
    from rich.console import Console

    from device_sim.accounting import VersionLedger
    from device_sim.devices import DeviceFleet
    from device_sim.fleet_config import FleetConfig


FLOAT_COLUMNS = ("accuracy", "first_accuracy", "energy_mah")


@dataclass(frozen=True, slots=True)
class FleetProgress:
    """One progress sample of one fleet process (``fedex devices`` shows these live)."""

    shard: int
    wall_s: float
    sim_s: float
    devices: int
    online: int
    pushes: int
    samples: int
    pushes_per_s: float
    samples_per_s: float
    retries: int
    evicted: int
    in_flight: int
    versions: int
    mean_accuracy: float

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def combine_progress(parts: Sequence[FleetProgress]) -> FleetProgress:
    """The fleet-wide view of the latest progress of each shard."""
    devices = sum(p.devices for p in parts)
    weighted = [(p.mean_accuracy, p.devices) for p in parts if math.isfinite(p.mean_accuracy)]
    weight = sum(n for _, n in weighted)
    return FleetProgress(
        shard=-1,
        wall_s=max((p.wall_s for p in parts), default=0.0),
        sim_s=max((p.sim_s for p in parts), default=0.0),
        devices=devices,
        online=sum(p.online for p in parts),
        pushes=sum(p.pushes for p in parts),
        samples=sum(p.samples for p in parts),
        pushes_per_s=sum(p.pushes_per_s for p in parts),
        samples_per_s=sum(p.samples_per_s for p in parts),
        retries=sum(p.retries for p in parts),
        evicted=sum(p.evicted for p in parts),
        in_flight=sum(p.in_flight for p in parts),
        versions=max((p.versions for p in parts), default=0),
        mean_accuracy=sum(a * n for a, n in weighted) / weight if weight else math.nan,
    )


def peak_rss_bytes() -> int:
    """This process's resident-set high-water mark as the kernel keeps it (``VmHWM``;
    ``ru_maxrss`` where there is no /proc): no sampling can miss a start-up peak."""
    import resource

    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class ProcessSampler:
    """Event-loop lag (how late a ``sleep(interval)`` wakes up) and RSS of this process,
    sampled by one task while the fleet runs; the peak is the kernel's high-water mark."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.lag_ms = LogHistogram(low=0.01, high=1e5)
        self.rss_peak = 0
        self.rss_samples: list[int] = []

    async def sample(self) -> None:
        import asyncio

        import psutil

        me = psutil.Process()
        loop = asyncio.get_running_loop()
        beat = 0
        while True:
            before = loop.time()
            await asyncio.sleep(self.interval)
            self.lag_ms.add((loop.time() - before - self.interval) * 1000.0)
            beat += 1
            if beat % 25 == 1:
                rss = me.memory_info().rss
                self.rss_samples.append(rss)
                self.rss_peak = max(self.rss_peak, rss)

    def summary(self) -> dict[str, Any]:
        import os
        import statistics

        steady = self.rss_samples[len(self.rss_samples) // 2 :]
        return {
            "pid": os.getpid(),
            "rss_peak_mb": peak_rss_bytes() / 2**20,
            "rss_peak_sampled_mb": self.rss_peak / 2**20,
            "rss_steady_mb": statistics.median(steady) / 2**20 if steady else None,
            "loop_lag_ms": self.lag_ms.summary(),
        }


# --------------------------------------------------------------------------- summary


def summarize(
    fleet: DeviceFleet,
    ledger: VersionLedger,
    config: FleetConfig,
    *,
    wall_s: float,
    sim_s: float,
    stop_reason: str,
    in_flight: int,
    refused: Sequence[Mapping[str, Any]] = (),
    subscriber: Any = None,
    initial_accuracy: float = math.nan,
    process: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    counters = fleet.counters
    columns: dict[str, Any] = {name: counters[name] for name in COUNTERS}
    columns["energy_mah"] = config.energy.mah(
        counters["inferences"], counters["bytes_up"], counters["bytes_down"], fleet.compute_speed
    )
    columns["accuracy"] = fleet.accuracy.astype(np.float64)
    columns["first_accuracy"] = fleet.first_accuracy.astype(np.float64)
    columns["vendor"] = fleet.vendor
    columns["cached"] = fleet.cached
    columns["model"] = fleet.model_of
    columns["compute_tier"] = fleet.compute_tier
    columns["network_tier"] = fleet.network_tier
    summary: dict[str, Any] = {
        "config": _config_dict(config),
        "stop_reason": stop_reason,
        "shards": 1,
        "wall_s": wall_s,
        "sim_s": sim_s,
        "devices": fleet.n,
        "model_ids": list(fleet.model_ids),
        "network_tiers": list(fleet.network.names),
        "in_flight": in_flight,
        "versions": [r.as_dict() for r in ledger.records],
        "refused": list(refused),
        "freshness_sim_s": fleet.freshness.freshness_s.to_dict(),
        "freshness_pending": fleet.freshness.pending,
        "freshness_excluded": fleet.freshness.excluded,
        "initial_accuracy": initial_accuracy,
        "processes": [dict(process)] if process is not None else [],
        "subscriber": dataclasses.asdict(subscriber) if subscriber is not None else None,
        "energy_model": config.energy.as_dict(),
        "columns": {k: np.asarray(v).tolist() for k, v in columns.items()},
    }
    return finish(summary, keep_columns=config.per_device)


def finish(summary: dict[str, Any], *, keep_columns: bool) -> dict[str, Any]:
    """Derive totals, distributions and breakdowns from the per-device columns."""
    # Floats may come back from JSON with NaN as null: float columns are cast back.
    cols = {
        k: np.asarray(v, dtype=np.float64 if k in FLOAT_COLUMNS else np.int64)
        for k, v in summary["columns"].items()
    }
    totals: dict[str, Any] = {name: int(cols[name].sum()) for name in COUNTERS}
    totals["energy_mah"] = float(cols["energy_mah"].sum())
    totals["energy_j"] = float(EnergyModel.calibrated().joules(totals["energy_mah"]))
    totals["cached_unsent"] = int(cols["cached"].sum())
    totals["in_flight_at_end"] = summary["in_flight"]
    wall = max(summary["wall_s"], 1e-9)
    totals["pushes_per_s"] = totals["pushes"] / wall
    totals["samples_per_s"] = totals["samples_pushed"] / wall
    summary["totals"] = totals
    summary["per_device"] = {
        name: distribution(cols[name])
        for name in (*COUNTERS, "energy_mah", "accuracy", "cached")
        if name in cols
    }
    acc = cols["accuracy"]
    summary["final_accuracy"] = float(np.nanmean(acc)) if np.isfinite(acc).any() else math.nan
    summary["per_model"] = _breakdown(cols, "model", list(summary["model_ids"]))
    summary["per_compute_tier"] = _breakdown(cols, "compute_tier", [t.name for t in COMPUTE_TIERS])
    summary["per_network_tier"] = _breakdown(cols, "network_tier", list(summary["network_tiers"]))
    if "vendor" in cols:
        summary["per_vendor"] = _breakdown(cols, "vendor", vendor_names(cols["vendor"]))
        summary["vendor_spread"] = vendor_spread(summary["per_vendor"])
    hist = LogHistogram.from_dict(summary["freshness_sim_s"])
    scale = float(summary["config"]["time_scale"])
    fresh = hist.summary()
    summary["freshness"] = {
        "sim_s": fresh,
        "wall_s": {k: (v / scale if k != "n" else v) for k, v in fresh.items()},
        "pending": summary["freshness_pending"],
        "excluded": summary["freshness_excluded"],
    }
    if not keep_columns:
        summary.pop("columns")
    return summary


def _breakdown(cols: Mapping[str, np.ndarray], key: str, names: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for i, name in enumerate(names):
        sel = cols[key] == i
        if not sel.any():
            continue
        acc = cols["accuracy"][sel]
        out[name] = {
            "devices": int(sel.sum()),
            "pushes": int(cols["pushes"][sel].sum()),
            "samples_pushed": int(cols["samples_pushed"][sel].sum()),
            "retries": int(cols["retries"][sel].sum()),
            "evicted": int(cols["evicted"][sel].sum()),
            "bytes_up": int(cols["bytes_up"][sel].sum()),
            "bytes_down": int(cols["bytes_down"][sel].sum()),
            "energy_mah_mean": float(cols["energy_mah"][sel].mean()),
            "accuracy": float(np.nanmean(acc)) if np.isfinite(acc).any() else math.nan,
        }
        if "first_accuracy" in cols:
            first = cols["first_accuracy"][sel]
            out[name]["first_accuracy"] = (
                float(np.nanmean(first)) if np.isfinite(first).any() else math.nan
            )
    return out


def vendor_names(vendors: np.ndarray) -> list[str]:
    """Names of the camera domains up to the highest vendor seen (0 is the clean camera)."""
    top = int(vendors.max(initial=0))
    return ["clean", *(f"vendor-{v}" for v in range(1, top + 1))]


def vendor_spread(per_vendor: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """System-induced heterogeneity: best - worst vendor's mean device accuracy, the
    variance over vendors and the worst vendor, with the base model and at the end."""
    out: dict[str, Any] = {}
    for key, label in (("first_accuracy", "first"), ("accuracy", "final")):
        acc = {
            v: float(row[key])
            for v, row in per_vendor.items()
            if key in row and math.isfinite(float(row[key]))
        }
        if not acc:
            continue
        worst = min(acc, key=lambda v: acc[v])
        values = np.asarray(list(acc.values()))
        out[label] = {
            "spread": float(values.max() - values.min()),
            "variance": float(values.var()),
            "worst_vendor": worst,
            "worst_accuracy": acc[worst],
        }
    return out


def _config_dict(config: FleetConfig) -> dict[str, Any]:
    params = dataclasses.asdict(config.params)
    params["availability"] = str(config.params.availability)
    params["network_mix"] = dict(config.params.network_mix)
    return {
        "count": config.count,
        "models": config.models,
        "cut": str(config.cut),
        "backbone": str(config.backbone),
        "features": config.features,
        "duration_s": config.schedule.duration_s,
        "max_pushes": config.schedule.max_pushes,
        "seed": config.seed,
        "time_scale": config.schedule.time_scale,
        "tick_s": config.schedule.tick_s,
        "shard": [config.shard_index, config.shard_count],
        "compression": config.sending.compression,
        "params": params,
    }


def merge_summaries(shards: Sequence[dict[str, Any]], *, keep_columns: bool = False) -> dict:
    """Combine the summaries of shards (each written with per-device columns)."""
    if not shards:
        raise ValueError("no shard summaries to merge")
    for s in shards:
        if "columns" not in s:
            raise ValueError("shard summaries need their per-device columns (per_device)")
    base = dict(shards[0])
    base["config"] = dict(base["config"], shard=[0, 1])
    base["shards"] = len(shards)
    base["devices"] = sum(int(s["devices"]) for s in shards)
    base["wall_s"] = max(float(s["wall_s"]) for s in shards)
    base["sim_s"] = max(float(s["sim_s"]) for s in shards)
    base["in_flight"] = sum(int(s["in_flight"]) for s in shards)
    base["stop_reason"] = ",".join(sorted({str(s["stop_reason"]) for s in shards}))
    base["versions"] = merge_versions([s["versions"] for s in shards])
    base["refused"] = [r for s in shards for r in s["refused"]]
    hist = LogHistogram.from_dict(shards[0]["freshness_sim_s"])
    for s in shards[1:]:
        hist.merge(LogHistogram.from_dict(s["freshness_sim_s"]))
    base["freshness_sim_s"] = hist.to_dict()
    base["freshness_pending"] = sum(int(s["freshness_pending"]) for s in shards)
    base["freshness_excluded"] = sum(int(s["freshness_excluded"]) for s in shards)
    base["subscriber"] = [s["subscriber"] for s in shards]
    base["processes"] = [p for s in shards for p in s.get("processes", [])]
    firsts = [(s["initial_accuracy"], s["devices"]) for s in shards]
    finite = [(a, n) for a, n in firsts if a is not None and math.isfinite(a)]
    weight = sum(n for _, n in finite)
    base["initial_accuracy"] = sum(a * n for a, n in finite) / weight if weight else math.nan
    base["columns"] = {
        k: [x for s in shards for x in s["columns"][k]] for k in shards[0]["columns"]
    }
    return finish(base, keep_columns=keep_columns)


def write_json(summary: Mapping[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    tmp.replace(path)
    return path


def print_summary(summary: Mapping[str, Any], console: Console) -> None:
    """The final tables: totals, per model, per version, per tier."""
    t = summary["totals"]
    fresh = summary["freshness"]
    table = Table(title=f"fleet: {summary['devices']:,} devices, stop: {summary['stop_reason']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("wall / simulated", f"{summary['wall_s']:.0f} s / {summary['sim_s'] / 3600:.1f} h"),
        ("pushes (acked)", fmt(t["pushes"])),
        ("samples pushed", fmt(t["samples_pushed"])),
        ("pushes/s, samples/s", f"{fmt(t['pushes_per_s'])}, {fmt(t['samples_per_s'])}"),
        ("push attempts, retries", f"{fmt(t['push_attempts'])}, {fmt(t['retries'])}"),
        (
            "inferences, feedback (+ backlog)",
            f"{fmt(t['inferences'])}, {fmt(t['feedback'])} (+ {fmt(t['backlog'])})",
        ),
        (
            "confirmed, corrected, wrong labels",
            f"{fmt(t['confirmed'])}, {fmt(t['corrected'])}, {fmt(t['wrong_labels'])}",
        ),
        ("evicted, still cached", f"{fmt(t['evicted'])}, {fmt(t['cached_unsent'])}"),
        ("bytes up / down", f"{t['bytes_up'] / 1e6:,.1f} MB / {t['bytes_down'] / 1e6:,.1f} MB"),
        (
            "energy (fleet, per device)",
            f"{t['energy_mah']:,.0f} mAh, {summary['per_device']['energy_mah']['mean']:.2f} mAh",
        ),
        (
            "accuracy initial → final",
            f"{summary['initial_accuracy']:.1%} → {summary['final_accuracy']:.1%}",
        ),
        (
            "freshness p50 / p99 (sim)",
            f"{fresh['sim_s']['p50'] / 3600:.2f} h / {fresh['sim_s']['p99'] / 3600:.2f} h "
            f"(n={fresh['sim_s']['n']:,}, pending {fresh['pending']:,})",
        ),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    console.print(_versions_table(summary))
    console.print(_tiers_table(summary))


def _versions_table(summary: Mapping[str, Any]) -> Table:
    versions = Table(title="versions")
    for col in (
        "model",
        "version",
        "best",
        "devices",
        "applied",
        "acc. before",
        "acc. after",
        "fan-out p99 (s)",
    ):
        versions.add_column(col, justify="left" if col in ("model", "version") else "right")
    for v in summary["versions"]:
        fan = LogHistogram.from_dict(v["fanout_wall_s"]).percentile(0.99)
        versions.add_row(
            v["model_id"],
            v["version"],
            "yes" if v["is_best"] else "no",
            fmt(v["devices"]),
            fmt(v["applied"]),
            f"{v['accuracy_before']:.1%}",
            f"{v['accuracy_after']:.1%}",
            f"{fan:.2f}",
        )
    return versions


def _tiers_table(summary: Mapping[str, Any]) -> Table:
    spread = summary.get("vendor_spread", {}).get("final")
    title = "per tier, vendor and model"
    if spread:
        title += (
            f" (vendor spread {spread['spread']:.1%}, worst {spread['worst_vendor']} "
            f"{spread['worst_accuracy']:.1%})"
        )
    tiers = Table(title=title)
    for col in ("tier", "devices", "pushes", "retries", "MB up", "mAh/device", "accuracy"):
        tiers.add_column(col, justify="left" if col == "tier" else "right")
    for group in ("per_compute_tier", "per_network_tier", "per_vendor", "per_model"):
        for name, row in summary.get(group, {}).items():
            tiers.add_row(
                name,
                fmt(row["devices"]),
                fmt(row["pushes"]),
                fmt(row["retries"]),
                f"{row['bytes_up'] / 1e6:,.1f}",
                f"{row['energy_mah_mean']:.2f}",
                f"{row['accuracy']:.1%}",
            )
    return tiers
