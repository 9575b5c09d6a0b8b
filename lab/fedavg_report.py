"""The side-by-side FedEx / FedAvg result: pure analysis and the printed tables.

``lab.fedavg_bench`` measures; this module turns each seed's FedAvg accuracy curve into the
cost of reaching fixed targets, summarises the seeds (median and min–max of the ratios),
checks that the task's observations are distinct, summarises accuracy per vendor, and
prints what ``fedex bench fedavg`` shows. No I/O apart from :func:`print_report`.

Targets (:func:`targets_for`), per seed:

- ``absolute``: fixed accuracies (0.90, 0.95); a comparison only where FedEx reached it;
- ``gain``: a share of FedEx's gain over ``v0`` (``v0 + q · (FedEx - v0)``), the relative
  targets of a task where the absolute ones are out of reach;
- ``fedex``: the accuracy FedEx reached (its one version).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from rich.console import Console

#: Default fixed targets (accuracy of the mean device) and shares of FedEx's gain over v0.
ABSOLUTE_TARGETS: Final = (0.90, 0.95)
GAIN_TARGETS: Final = (0.90, 0.95)
KIND_ABSOLUTE: Final = "absolute"
KIND_GAIN: Final = "gain"
KIND_FEDEX: Final = "fedex"
FEDEX_TARGET: Final = "FedEx's accuracy"
_EPS: Final = 1e-12


# --------------------------------------------------------------------------- targets & costs


def target_name(kind: str, value: float) -> str:
    """``0.90``, ``90% of FedEx's gain`` or ``FedEx's accuracy``."""
    if kind == KIND_ABSOLUTE:
        return f"{value:.2f}"
    if kind == KIND_GAIN:
        return f"{value:.0%} of FedEx's gain"
    return FEDEX_TARGET


def targets_for(
    base: float,
    fedex: float,
    absolute: Sequence[float] = ABSOLUTE_TARGETS,
    gains: Sequence[float] = GAIN_TARGETS,
) -> list[dict[str, Any]]:
    """The seed's targets (module docstring): name, kind, the accuracy needed and whether
    FedEx reached it (a target FedEx missed compares nothing)."""
    needed = [(KIND_ABSOLUTE, a, a) for a in absolute]
    needed += [(KIND_GAIN, q, base + q * (fedex - base)) for q in gains]
    needed.append((KIND_FEDEX, 1.0, fedex))
    out: list[dict[str, Any]] = [
        {
            "name": target_name(kind, value),
            "kind": kind,
            "accuracy": accuracy,
            "fedex_reached": bool(fedex >= accuracy - _EPS),
        }
        for kind, value, accuracy in needed
    ]
    return out


def cost_at(
    curve: Sequence[Mapping[str, float]],
    target: float,
    *,
    final_download: int,
    fedex_bytes: float,
    fedex_wall: float,
) -> dict[str, Any]:
    """FedAvg's cost of reaching ``target``: the first round of ``curve`` at or above it,
    the bytes per device spent until then plus the final download of the head, its wall
    time, and both as multiples of FedEx's. Not reached: what the whole run spent, as a
    lower bound of the ratio."""
    hit = next((p for p in curve if p["accuracy"] >= target - _EPS), None)
    if hit is None:
        spent = (curve[-1]["bytes_per_device"] if curve else 0.0) + final_download
        return {
            "reached": False,
            "rounds_run": int(curve[-1]["round"]) if curve else 0,
            "bytes_per_device": spent,
            "bytes_ratio_lower_bound": spent / fedex_bytes,
        }
    spent = hit["bytes_per_device"] + final_download
    return {
        "reached": True,
        "round": int(hit["round"]),
        "bytes_per_device": spent,
        "wall_seconds": hit["wall_seconds"],
        "bytes_ratio": spent / fedex_bytes,
        "wall_ratio": hit["wall_seconds"] / fedex_wall if fedex_wall > 0 else math.nan,
    }


def per_device(values: Sequence[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "min": float(array.min()), "max": float(array.max())}


def stats(values: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and count; ``n = 0`` and ``None``s for no values."""
    kept = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not kept:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(kept), "min": min(kept), "max": max(kept), "n": len(kept)}


# --------------------------------------------------------------------------- the task's data


def row_keys(x: npt.NDArray[Any]) -> set[bytes]:
    """Each row's bytes: equal keys are equal vectors (same dtype)."""
    return set(_keys(x))


def _keys(x: npt.NDArray[Any]) -> list[bytes]:
    rows = np.ascontiguousarray(x).reshape(x.shape[0], int(np.prod(x.shape[1:])))
    return [row.tobytes() for row in rows]


def distinct_report(
    trained: npt.NDArray[Any], validation: npt.NDArray[Any], test: npt.NDArray[Any]
) -> dict[str, int]:
    """How far a task is from distinct observations: copies among every sample (trained
    and validation), validation rows equal to a trained one, test rows equal to a trained
    or a validation one. All the counts of copies zero is the requirement."""
    trained_keys = row_keys(trained)
    validation_keys = row_keys(validation)
    test_keys = _keys(test)
    samples = int(trained.shape[0] + validation.shape[0])
    return {
        "trained": int(trained.shape[0]),
        "validation": int(validation.shape[0]),
        "test": len(test_keys),
        "sample_copies": samples - len(trained_keys | validation_keys),
        "validation_in_trained": len(validation_keys & trained_keys),
        "test_in_trained": sum(k in trained_keys for k in test_keys),
        "test_in_validation": sum(k in validation_keys for k in test_keys),
    }


def copies(report: Mapping[str, int]) -> int:
    """Every copy :func:`distinct_report` counted (0: the task is distinct)."""
    keys = ("sample_copies", "validation_in_trained", "test_in_trained", "test_in_validation")
    return sum(int(report[k]) for k in keys)


def vendor_report(
    correct: npt.NDArray[np.bool_], domains: npt.NDArray[np.integer[Any]]
) -> dict[str, Any]:
    """Accuracy per vendor (pooled over its test rows), best - worst, the variance over
    vendors and the worst vendor (:func:`lab.datafraction_bench.vendor_summary`)."""
    from lab.datafraction_bench import vendor_summary

    per, spread, worst = vendor_summary(correct, domains)
    values = np.asarray(list(per.values()), dtype=np.float64)
    return {
        "per_vendor": per,
        "spread": spread,
        "variance": float(values.var()) if values.size else math.nan,
        "worst_vendor": worst,
        "worst_accuracy": per.get(str(worst), math.nan),
    }


# --------------------------------------------------------------------------- over seeds


def summarize(seeds: Sequence[Mapping[str, Any]], dtypes: Sequence[str]) -> dict[str, Any]:
    """Median and min–max over seeds: FedEx's accuracy, bytes, wall time and vendor
    spread; each FedAvg precision's final accuracy and spread; and per target, for each
    precision, how many seeds reached it (of those where FedEx did) and the ratios."""

    def over(values: Sequence[Any]) -> dict[str, Any]:
        return stats([v for v in values if isinstance(v, (int, float))])

    fedex = [s["fedex"] for s in seeds]
    out: dict[str, Any] = {
        "seeds": len(seeds),
        "base_accuracy": over([s["base_accuracy"] for s in seeds]),
        "fedex": {
            "accuracy": over([f["accuracy"] for f in fedex]),
            "bytes_per_device": over([f["bytes_per_device"]["mean"] for f in fedex]),
            "wall_seconds": over([f["wall_seconds"] for f in fedex]),
            "vendor_spread": over([f["vendors"]["spread"] for f in fedex]),
            "worst_vendor_accuracy": over([f["vendors"]["worst_accuracy"] for f in fedex]),
            "promoted": sum(bool(f.get("is_best")) for f in fedex),
        },
        "fedavg": {},
        "targets": [],
    }
    for dtype in dtypes:
        arms = [s["fedavg"][dtype] for s in seeds]
        out["fedavg"][dtype] = {
            "final_accuracy": over([a["accuracy"] for a in arms]),
            "rounds": over([a["rounds"] for a in arms]),
            "vendor_spread": over([a["vendors"]["spread"] for a in arms]),
            "worst_vendor_accuracy": over([a["vendors"]["worst_accuracy"] for a in arms]),
        }
    for index, first in enumerate(seeds[0]["targets"] if seeds else []):
        per_seed = [s["targets"][index] for s in seeds]
        entry: dict[str, Any] = {
            "name": first["name"],
            "kind": first["kind"],
            "accuracy": over([t["accuracy"] for t in per_seed]),
            "fedex_reached": sum(t["fedex_reached"] for t in per_seed),
            "fedavg": {},
        }
        for dtype in dtypes:
            costs = [
                s["fedavg"][dtype]["costs"][index]
                for s, t in zip(seeds, per_seed, strict=True)
                if t["fedex_reached"]
            ]
            hit = [c for c in costs if c["reached"]]
            entry["fedavg"][dtype] = {
                "reached": len(hit),
                "of": len(costs),
                "bytes_ratio": over([c["bytes_ratio"] for c in hit]),
                "wall_ratio": over([c["wall_ratio"] for c in hit]),
                "bytes_per_device": over([c["bytes_per_device"] for c in hit]),
                "rounds": over([c["round"] for c in hit]),
                "unreached_ratio_lower_bounds": [
                    c["bytes_ratio_lower_bound"] for c in costs if not c["reached"]
                ],
            }
        out["targets"].append(entry)
    return out


def headline(summary: Mapping[str, Any], dtype: str = "float16") -> dict[str, Any]:
    """The ratio quoted first: bytes per device to FedEx's accuracy, FedAvg at the same
    precision as FedEx's pushes (fp16), median over the seeds that reached it."""
    target = next((t for t in summary["targets"] if t["kind"] == KIND_FEDEX), None)
    arm = (target or {}).get("fedavg", {}).get(dtype)
    if arm is None:
        return {"target": FEDEX_TARGET, "dtype": dtype, "bytes_ratio": None, "reached": 0, "of": 0}
    return {
        "target": FEDEX_TARGET,
        "dtype": dtype,
        "bytes_ratio": arm["bytes_ratio"]["median"],
        "bytes_ratio_min": arm["bytes_ratio"]["min"],
        "bytes_ratio_max": arm["bytes_ratio"]["max"],
        "wall_ratio": arm["wall_ratio"]["median"],
        "reached": arm["reached"],
        "of": arm["of"],
    }


# --------------------------------------------------------------------------- printing


def _range(s: Mapping[str, Any], digits: int = 3) -> str:
    if not s or s.get("median") is None:
        return "-"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def print_report(result: Mapping[str, Any], console: Console) -> None:
    """The command's summary at the terminal: both arms' final numbers, FedAvg's cost of
    each target, and the headline ratio."""
    from pipeline.tables import print_table

    summary, dtypes = result["summary"], result["config"]["fedavg_dtypes"]
    task = result["task"]
    print_table(
        f"FedEx vs FedAvg, {task['devices']} devices x {task['samples_per_device']} samples, "
        f"{task['num_classes']} classes, {summary['seeds']} seeds: median (min–max); "
        f"v0 {_range(summary['base_accuracy'])}",
        ["arm", "final accuracy", "vendor spread", "worst vendor", "rounds", "B/device"],
        _final_rows(summary, dtypes),
        console,
    )
    print_table(
        "FedAvg's cost to reach each target, as a multiple of FedEx's (median (min–max))",
        [
            "target",
            "accuracy",
            "FedEx reached",
            "FedAvg",
            "reached",
            "round",
            "B/device ×",
            "wall ×",
            "not reached: ×",
        ],
        _target_rows(summary, dtypes),
        console,
    )
    console.print(_headline_line(result), highlight=False)


def _final_rows(summary: Mapping[str, Any], dtypes: Sequence[str]) -> list[list[str]]:
    """Per arm (FedEx, then FedAvg at each precision): final accuracy, vendor spread, worst
    vendor, rounds and bytes per device, over seeds."""
    fx = summary["fedex"]
    rows = [
        [
            "FedEx",
            _range(fx["accuracy"]),
            _range(fx["vendor_spread"]),
            _range(fx["worst_vendor_accuracy"]),
            "1",
            _range(fx["bytes_per_device"], 0),
        ]
    ]
    for dtype in dtypes:
        arm = summary["fedavg"][dtype]
        rows.append(
            [
                f"FedAvg {dtype}",
                _range(arm["final_accuracy"]),
                _range(arm["vendor_spread"]),
                _range(arm["worst_vendor_accuracy"]),
                _range(arm["rounds"], 0),
                "-",
            ]
        )
    return rows


def _target_rows(summary: Mapping[str, Any], dtypes: Sequence[str]) -> list[list[str]]:
    """Per target and FedAvg precision: how many seeds reached it and at what cost."""
    rows = []
    for t in summary["targets"]:
        for dtype in dtypes:
            arm = t["fedavg"][dtype]
            bounds = arm["unreached_ratio_lower_bounds"]
            rows.append(
                [
                    t["name"],
                    _range(t["accuracy"]),
                    f"{t['fedex_reached']}/{summary['seeds']}",
                    dtype,
                    f"{arm['reached']}/{arm['of']}",
                    _range(arm["rounds"], 0),
                    _range(arm["bytes_ratio"], 1),
                    _range(arm["wall_ratio"], 1),
                    ", ".join(f">{b:.1f}" for b in bounds) or "-",
                ]
            )
    return rows


def _headline_line(result: Mapping[str, Any]) -> str:
    """The headline: FedAvg's bytes per device to FedEx's accuracy over FedEx's."""
    head = result["headline"]
    ratio = head.get("bytes_ratio")
    return (
        f"FedAvg ({head['dtype']}) / FedEx bytes per device to FedEx's accuracy: "
        + (
            f"median {ratio:.1f} ({head['bytes_ratio_min']:.1f}–{head['bytes_ratio_max']:.1f}) "
            f"over the {head['reached']} of {head['of']} seeds that reached it"
            if ratio is not None
            else f"not reached in any of {head['of']} seeds"
        )
        + f" (target ≥ {result['target_ratio']:g}: "
        f"{'met' if result['meets_target'] else 'not met'})"
    )
