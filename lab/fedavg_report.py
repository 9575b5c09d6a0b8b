"""The side-by-side FedEx / FedAvg result: pure analysis and the printed tables.

``lab.fedavg_bench`` measures; this module turns its curve into the cost of reaching
FedEx's accuracy within each tolerance and prints what ``fedex bench fedavg`` shows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from rich.console import Console

#: Accuracy gaps below FedEx's at which FedAvg's cost is also reported (0 = the target).
TOLERANCES = (0.0, 0.005, 0.01, 0.02)


def cost_to_reach(
    curve: Sequence[dict[str, float]], target: float, final_download: int, fedex_bytes: float
) -> list[dict[str, Any]]:
    """For each tolerance: the first FedAvg round whose accuracy is ≥ ``target - tol``, the
    bytes per device spent until then plus the final download, and the ratio to FedEx's."""
    out: list[dict[str, Any]] = []
    for tol in TOLERANCES:
        hit = next((p for p in curve if p["accuracy"] >= target - tol - 1e-12), None)
        entry: dict[str, Any] = {"tolerance": tol, "accuracy_needed": target - tol}
        if hit is None:
            entry.update(reached=False)
        else:
            spent = hit["bytes_per_device"] + final_download
            entry.update(
                reached=True,
                round=int(hit["round"]),
                wall_seconds=hit["wall_seconds"],
                bytes_per_device=spent,
                ratio=spent / fedex_bytes,
            )
        out.append(entry)
    return out


def per_device(values: Sequence[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "min": float(array.min()), "max": float(array.max())}


def print_report(result: dict[str, Any], console: Console) -> None:
    from pipeline.tables import print_table

    fedex, fedavg = result["fedex"], result["fedavg"]
    rows = []
    for name, arm in (("FedEx", fedex), ("FedAvg", fedavg)):
        compute = arm["device_compute_seconds_per_device"]
        rows.append(
            [
                name,
                arm["accuracy"],
                arm["rounds"],
                arm["bytes_up_per_device"]["mean"],
                arm["bytes_down_per_device"]["mean"],
                arm["bytes_per_device"]["mean"],
                compute if isinstance(compute, float) else compute["mean"],
                arm["wall_seconds"],
            ]
        )
    print_table(
        f"FedEx vs FedAvg, {result['task']['devices']} devices "
        f"(v0 accuracy {result['task']['base_accuracy']:.3f})",
        [
            "arm",
            "accuracy",
            "rounds",
            "B up/device",
            "B down/device",
            "B/device",
            "device compute s",
            "wall s",
        ],
        rows,
        console,
    )
    print_table(
        "FedAvg's cost to come within a tolerance of FedEx's accuracy",
        ["tolerance", "accuracy needed", "round", "B/device", "ratio to FedEx", "wall s"],
        [
            [
                c["tolerance"],
                c["accuracy_needed"],
                c.get("round", "not reached"),
                c.get("bytes_per_device", "-"),
                c.get("ratio", "-"),
                c.get("wall_seconds", "-"),
            ]
            for c in fedavg["cost_to_reach"]
        ],
        console,
    )
    verdict = "reached" if fedavg["reached"] else "did NOT reach"
    console.print(
        f"FedAvg {verdict} FedEx's accuracy {fedex['accuracy']:.4f} in {fedavg['rounds']} "
        "rounds; bytes per device "
        f"FedAvg / FedEx = {result['bytes_ratio_fedavg_over_fedex']:.1f} (target ≥ 20: "
        f"{'met' if result['meets_target'] else 'not met'})",
        highlight=False,
    )
