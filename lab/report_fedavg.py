"""The FedAvg section of ``docs/benchmarks.md`` (``fedex bench fedavg``): the task, the
final accuracies and costs of both arms, and FedAvg's cost of reaching each target over
seeds. Pure: strings out, nothing read or written."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lab.report_data import (
    Report,
    num,
    open_section,
    table,
)
from lab.report_sections import section_generic


def section_fedavg(report: Report, img: str | None) -> str:
    r = report.results["fedavg"]
    out, d = open_section(r, "FedAvg baseline vs FedEx")
    if d is None:
        return out
    summary = d.get("summary")
    if not isinstance(summary, Mapping) or not isinstance(summary.get("targets"), list):
        return section_generic(report, "fedavg", "FedAvg baseline vs FedEx")
    out += fedavg_task_note(d) + "\n\n"
    out += fedavg_final_table(summary) + "\n\n" + fedavg_target_table(summary)
    head = d.get("headline") or {}
    met = "met" if d.get("meets_target") else "not met"
    ratio = spread_cell(
        head.get("bytes_ratio"), head.get("bytes_ratio_min"), head.get("bytes_ratio_max")
    )
    out += (
        f"\n\nBytes per device to FedEx's accuracy, FedAvg {head.get('dtype', '?')} / FedEx: "
        f"**{ratio}**"
        f" (median, min–max over the {num(head.get('reached'))} of {num(head.get('of'))} seeds "
        f"that reached it; target ≥ {num(d.get('target_ratio'))}: {met})."
    )
    if img:
        out += f"\n\n![FedAvg accuracy vs bytes per device, FedEx as points]({img})"
    return out + f"\n\nReproduce: `{r.command}`."


def spread_cell(median: Any, low: Any, high: Any, digits: int = 3) -> str:
    """``median (min–max)``; the median alone when the range is one value; ``—`` if none."""
    if median is None:
        return "—"
    if low is None or high is None or low == high:
        return num(median, digits)
    return f"{num(median, digits)} ({num(low, digits)}–{num(high, digits)})"


def stats_cell(doc: Any, digits: int = 3) -> str:
    """:func:`spread_cell` of a ``{median, min, max}`` document."""
    if not isinstance(doc, Mapping):
        return "—"
    return spread_cell(doc.get("median"), doc.get("min"), doc.get("max"), digits)


def fedavg_task_note(d: Mapping[str, Any]) -> str:
    """The task both arms share, its distinctness check and the trainer's settings."""
    task, summary = d.get("task") or {}, d.get("summary") or {}
    checks = task.get("distinct") or []
    copies = sum(
        int(c.get(k, 0))
        for c in checks
        for k in ("sample_copies", "validation_in_trained", "test_in_trained", "test_in_validation")
    )
    ts = d.get("trainer_settings") or {}
    return (
        f"Same task for both arms, {num(summary.get('seeds'))} seeds: "
        f"{num(task.get('devices'))} devices x {num(task.get('samples_per_device'))} samples, "
        f"{num(task.get('num_classes'))} classes, {task.get('backbone', '?')} at "
        f"{task.get('cut', '?')}; v0 accuracy {stats_cell(summary.get('base_accuracy'))}. "
        f"Data: {task.get('data', '?')}; copies of a trained vector among the samples, the "
        f"trainer's validation split and the test rows: {num(copies)} over "
        f"{num(len(checks))} seeds. Evaluation: {task.get('evaluation', '?')}. FedEx's trainer "
        f"ran with val_device_fraction {num(ts.get('val_device_fraction'))}, val_fraction "
        f"{num(ts.get('val_fraction'))}, val_max_samples {num(ts.get('val_max_samples'))}, "
        f"replay_max_samples {num(ts.get('replay_max_samples'))}, promote_margin "
        f"{num(ts.get('promote_margin'))}. Bytes are real encoded message sizes; FedAvg's head "
        "travels in fp32 and, in a second run on the same seed, in fp16 (FedEx pushes fp16)."
    )


def fedavg_final_table(summary: Mapping[str, Any]) -> str:
    """Each arm's final model: accuracy, vendor spread, worst vendor, rounds, bytes, wall."""
    fx = summary.get("fedex") or {}
    rows = [
        [
            "FedEx",
            stats_cell(fx.get("accuracy")),
            stats_cell(fx.get("vendor_spread")),
            stats_cell(fx.get("worst_vendor_accuracy")),
            "1",
            stats_cell(fx.get("bytes_per_device")),
            stats_cell(fx.get("wall_seconds")),
        ]
    ]
    for dtype, arm in (summary.get("fedavg") or {}).items():
        rows.append(
            [
                f"FedAvg {dtype}",
                stats_cell(arm.get("final_accuracy")),
                stats_cell(arm.get("vendor_spread")),
                stats_cell(arm.get("worst_vendor_accuracy")),
                stats_cell(arm.get("rounds")),
                "see below",
                "see below",
            ]
        )
    return table(
        [
            "arm (final model)",
            "accuracy",
            "vendor spread",
            "worst vendor",
            "rounds",
            "B/device",
            "wall s",
        ],
        rows,
    )


def fedavg_target_table(summary: Mapping[str, Any]) -> str:
    """Per target and FedAvg precision: seeds reached, rounds, and the ratios to FedEx."""
    seeds = summary.get("seeds")
    rows = []
    for t in summary.get("targets") or []:
        for dtype, arm in (t.get("fedavg") or {}).items():
            bounds = arm.get("unreached_ratio_lower_bounds") or []
            rows.append(
                [
                    t.get("name", "?"),
                    stats_cell(t.get("accuracy")),
                    f"{num(t.get('fedex_reached'))}/{num(seeds)}",
                    dtype,
                    f"{num(arm.get('reached'))}/{num(arm.get('of'))}",
                    stats_cell(arm.get("rounds")),
                    stats_cell(arm.get("bytes_per_device")),
                    stats_cell(arm.get("bytes_ratio")),
                    stats_cell(arm.get("wall_ratio")),
                    ", ".join(f"> {num(b)}" for b in bounds) or "—",
                ]
            )
    return table(
        [
            "target",
            "accuracy",
            "FedEx reached",
            "FedAvg",
            "FedAvg reached",
            "rounds",
            "FedAvg B/device",
            "B × FedEx",
            "wall × FedEx",
            "not reached: B × FedEx",
        ],
        rows,
    )
