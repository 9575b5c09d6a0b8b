"""The plots of ``docs/benchmarks.md`` (matplotlib, Agg backend, PNG): pure functions of
the result files, like :mod:`lab.report`. Each returns False, writing nothing, when
its data is absent."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lab.report_data import Report, dig
from lab.report_sections import tiers_of


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_train(report: Report, path: Path) -> bool:
    cpu, gpu = report.results["train"], (report.gpu[-1] if report.gpu else None)
    series: dict[str, dict[str, float]] = {"paper (Titan Xp)": {}}
    for label, result in (("ours, CPU", cpu), ("ours, GPU", gpu)):
        for row in dig(result.data if result else None, "levels") or []:
            if row.get("paper_img_per_s"):
                series["paper (Titan Xp)"][row["level"]] = row["paper_img_per_s"]
            series.setdefault(label, {})[row["level"]] = row["samples_per_s"]
    levels = list(series["paper (Titan Xp)"])
    if not levels:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series.items()):
        xs = [j + i * width for j, lv in enumerate(levels) if lv in values]
        ax.bar(xs, [values[lv] for lv in levels if lv in values], width, label=label)
    ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(levels))], levels)
    ax.set_yscale("log")
    return _finish(
        fig,
        ax,
        path,
        title="Head training throughput per freeze level",
        y="training samples/s (log)",
    )


def plot_push(report: Report, path: Path) -> bool:
    data = report.results["push"].data
    if not data or not data.get("levels"):
        return False
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, rows, what in ((left, data["levels"], "push"), (right, data.get("pull", []), "pull")):
        levels = [row["level"] for row in rows]
        ax.plot(levels, [dig(r, "http_s", "p50") for r in rows], "o-", label="loopback (HTTP)")
        for tier in tiers_of(data):
            ax.plot(levels, [dig(r, "tiers_s", tier) for r in rows], ".--", label=tier)
        paper = [(r["level"], r["paper_s"]) for r in rows if r.get("paper_s")]
        if paper:
            ax.plot(*zip(*paper, strict=True), "k*", markersize=12, label="paper")
        ax.set_yscale("log")
        ax.set_ylabel("seconds (log)")
        ax.set_title(f"{what} latency per level")
    left.legend(fontsize=8)
    return _save(fig, path)


def plot_datafraction(data: Mapping[str, Any] | None, path: Path) -> bool:
    """Accuracy vs fraction, one line with a ±std band per arm; v0 dashed."""
    curves = (data or {}).get("curves") or {}
    if not curves:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for arm, rows in curves.items():
        xs = [100 * r["fraction"] for r in rows]
        mean = [r["device_accuracy"]["mean"] for r in rows]
        std = [r["device_accuracy"]["std"] for r in rows]
        ax.plot(xs, mean, "o-", label=f"retrained on {arm}")
        ax.fill_between(
            xs,
            [m - s for m, s in zip(mean, std, strict=True)],
            [m + s for m, s in zip(mean, std, strict=True)],
            alpha=0.2,
        )
    first = next(iter(curves.values()))
    ax.axhline(first[0]["device_accuracy"]["mean"], color="grey", ls=":", label="base v0")
    ax.set_xscale("symlog", linthresh=2)
    ax.set_xlim(-0.2, 130)
    ax.set_xticks([100 * r["fraction"] for r in first], [f"{r['fraction']:.0%}" for r in first])
    return _finish(
        fig,
        ax,
        path,
        title="Accuracy vs fraction of additional data",
        x="fraction of additional user data",
        y="validation accuracy (device held-out)",
    )


def _finish(fig: Any, ax: Any, path: Path, *, title: str, y: str, x: str | None = None) -> bool:
    """A one-axes plot's axis labels, title and legend, then :func:`_save`."""
    if x is not None:
        ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title)
    ax.legend()
    return _save(fig, path)


def _save(fig: Any, path: Path) -> bool:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    _pyplot().close(fig)
    return True


def plot_fedavg(data: Mapping[str, Any] | None, path: Path) -> bool:
    """Every seed's FedAvg accuracy against the bytes each device has moved, round by
    round, one colour per transfer precision; FedEx as one point per seed (one push, one
    download); the median v0 dotted."""
    seeds = dig(data, "seeds") or []
    if not any(dig(s, "fedex", "accuracy") is not None for s in seeds):
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    colours = {"float32": "tab:blue", "float16": "tab:green"}
    labelled: set[str] = set()
    for s in seeds:
        for dtype, arm in (s.get("fedavg") or {}).items():
            curve = arm.get("curve") or []
            label = None if dtype in labelled else f"FedAvg {dtype} (per round, each seed)"
            labelled.add(dtype)
            ax.plot(
                [p["bytes_per_device"] + arm.get("final_download_bytes", 0) for p in curve],
                [p["accuracy"] for p in curve],
                "-",
                color=colours.get(dtype, "tab:grey"),
                alpha=0.6,
                lw=1,
                label=label,
            )
    fx = [(dig(s, "fedex", "bytes_per_device", "mean"), dig(s, "fedex", "accuracy")) for s in seeds]
    ax.plot([b for b, _ in fx], [a for _, a in fx], "r*", markersize=12, label="FedEx (each seed)")
    base = dig(data, "summary", "base_accuracy", "median")
    if base is not None:
        ax.axhline(base, color="grey", ls=":", label="base v0 (median)")
    ax.set_xscale("log")
    return _finish(
        fig,
        ax,
        path,
        title="FedAvg vs FedEx: accuracy against communication",
        x="bytes per device (log)",
        y="mean device accuracy",
    )
