"""The README's benchmark table, rendered from the result files.

Every cell comes from ``bench/results/*.json`` (:func:`rows`); each row names the
command that produced its file, the file's date and commit, and is marked stale when the
code it measures changed since (:mod:`lab.freshness`). :func:`update_readme` writes the
table between the README's markers; ``tests/unit/lab/test_readme_table.py`` fails when
the committed table differs from what the result files say.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

from lab.measure import describe
from lab.report_data import Report, Result, commit_of, dig, num, percent, seconds, table

BEGIN: Final = "<!-- bench-table:begin (rendered by `fedex bench report --render-only`) -->"
END: Final = "<!-- bench-table:end -->"
HEADERS: Final = ("benchmark", "command", "measured", "target", "result file")
STALE_MARK: Final = re.compile(r" — \*\*stale\*\*: [^|]*?(?= \|)")


def mark(ok: bool | None) -> str:
    return "—" if ok is None else ("✅" if ok else "❌ missed")


def _lt(value: Any, bound: float) -> bool | None:
    return None if not isinstance(value, (int, float)) else value <= bound


def _p99_or_max(doc: Mapping[str, Any] | None) -> Any:
    """The p99 where there were enough values, else the max (the stricter reading)."""
    if not doc:
        return None
    return doc.get("p99") if doc.get("p99") is not None else doc.get("max")


def codec_row(d: Mapping[str, Any]) -> tuple[str, str, str]:
    row = (d.get("rows") or [{}])[0]
    value = row.get("decode_samples_s")
    return (
        f"decode of {row.get('cut')} {row.get('dtype')} pushes of 10 samples, one pinned core",
        f"**{num(value)} samples/s** best of {num(dig(d, 'repeats'))} (median "
        f"{num(row.get('decode_samples_s_median'))}); encode {num(row.get('encode_samples_s'))}",
        f"≥ 200,000 samples/s {mark(_lt(200_000, value or 0))}",
    )


def kafka_row(d: Mapping[str, Any]) -> tuple[str, str, str]:
    median = d.get("samples_s_median")
    return (
        "raw aiokafka produce→consume of those pushes, 50 keys over 6 partitions",
        f"**median {num(median)} samples/s** over {num(d.get('repeats'))} runs after a warm-up "
        f"run ({num(d.get('samples_s_min'))}–{num(d.get('samples_s_best'))})",
        f"≥ 50,000 samples/s {mark(_lt(50_000, median or 0))}",
    )


def pipeline_row(d: Mapping[str, Any]) -> tuple[str, str, str]:
    a = d.get("agents") or {}
    tp = a.get("throughput") or {}
    ratio = tp.get("ratio_median")
    return (
        "samples through the aggregation agents vs raw Kafka, same records, interleaved",
        f"{num(a.get('agents_samples_s'))} vs {num(a.get('raw_kafka_samples_s'))} samples/s: "
        f"**ratio {num(ratio)}** (median of {num(tp.get('pairs'))} pairs, "
        f"{num(tp.get('ratio_min'))}–{num(tp.get('ratio_max'))}; warm-up pair "
        f"{num(tp.get('cold_ratio'))}); broker {dig(d, 'conditions', 'broker', 'source') or '?'}",
        f"≥ 0.5 {mark(_lt(0.5, ratio or 0))}",
    )


def trigger_row(d: Mapping[str, Any]) -> tuple[str, str, str]:
    a = d.get("agents") or {}
    sustained = dig(a, "sustained", "trigger_latency_s")
    return (
        "trigger latency (threshold crossed → trigger on the topic)",
        f"sustained load {describe(sustained)}; idle "
        f"{describe(a.get('idle_trigger_latency_s'))}; "
        f"flood {describe(a.get('trigger_latency_s'))}",
        f"sustained p99 ≤ 1 s {mark(_lt(_p99_or_max(sustained), 1.0))}",
    )


def update_row(d: Mapping[str, Any]) -> tuple[str, str, str]:
    u = d.get("update") or {}
    return (
        f"update latency (trigger → model update seen), freeze6, {u.get('device', '?')}",
        f"{describe(u.get('update_latency_s'))}, after {num(u.get('warmup_jobs'))} warm-up job",
        "—",
    )


def train_row(d: Mapping[str, Any]) -> tuple[str, str, str]:
    levels = {r["level"]: r for r in d.get("levels", [])}
    six = levels.get("freeze6", {})
    util = six.get("utilisation")
    others = ", ".join(
        f"{name} {num(levels[name]['samples_per_s'])}/s"
        for name in ("freeze5", "freeze4")
        if name in levels
    )
    return (
        "head training per freeze level vs the paper's Table 1 and the matmul ceiling",
        f"freeze6: **{num(six.get('samples_per_s'))} samples/s = {percent(util)} of the best "
        f"sgemm window** (exact FLOPs; median of {num(six.get('rounds'))} rounds, "
        f"{num(six.get('samples_per_s_min'))}–{num(six.get('samples_per_s_max'))}); {others}",
        f"≥ 50% of sgemm {mark(_lt(0.5, util or 0))}; H200 ≥ 100× 41,870/s: **not measured, "
        "no GPU was lent to this task**",
    )


def fleet_row(d: Mapping[str, Any]) -> tuple[str, str, str]:
    one = d.get("one_process") or {}
    lag = one.get("loop_lag_ms") or {}
    rss = one.get("rss_peak_mb")
    ok = _lt(rss, 1024)
    ok = ok and _lt(lag.get("p99"), 50) if ok is not None else ok
    return (
        f"{num(one.get('devices'))} devices in one process",
        f"**{num(rss)} MB peak RSS** (kernel high-water mark; steady "
        f"{num(one.get('rss_steady_mb'))} MB), event-loop lag p99 {num(lag.get('p99'))} ms "
        f"(n={num(lag.get('n'))}); {num(dig(one, 'sustained', 'pushes_s'))} pushes/s",
        f"≤ 1 GB, p99 ≤ 50 ms {mark(ok)}",
    )


def fanout_row(d: Mapping[str, Any]) -> tuple[str, str, str]:
    fan = d.get("fanout") or {}
    per_version = fan.get("fanout_from_ack_s")
    return (
        f"fan-out: update produced → head swapped on each of {num(fan.get('devices'))} devices, "
        f"with its simulated download ({fan.get('transfer', '?')})",
        f"per device: {describe(fan.get('per_device_from_ack_s'))}; to 99% of the devices, per "
        f"version: {describe(per_version)}",
        f"99% within 2 s {mark(_lt(_p99_or_max(per_version), 2.0))}",
    )


def big_fleet_row(d: Mapping[str, Any]) -> tuple[str, str, str]:
    big = d.get("multi_process") or {}
    return (
        f"{num(big.get('devices'))} devices across processes on this machine",
        f"{num(big.get('processes'))} processes, peak RSS max {num(big.get('rss_max_mb'))} MB; "
        f"{num(dig(big, 'sustained', 'pushes_s'))} pushes/s, "
        f"{num(dig(big, 'sustained', 'samples_s'))} samples/s sustained; worst process loop lag "
        f"p99 {num(big.get('loop_lag_p99_max_ms'))} ms",
        f"runs {mark(bool(big.get('devices')))}",
    )


def push_row(d: Mapping[str, Any]) -> tuple[str, str, str]:
    levels = {r["level"]: r for r in d.get("levels", [])}
    six, one = levels.get("freeze6", {}), levels.get("freeze1", {})
    n = dig(six, "kafka_s", "n")
    return (
        "push of 10 samples, freeze6 / freeze1 (Table 2)",
        f"{num(six.get('push_bytes'))} / {num(one.get('push_bytes'))} B; p50 of n={num(n)}: "
        f"Kafka acks=all {seconds(dig(six, 'kafka_s', 'p50'))} / "
        f"{seconds(dig(one, 'kafka_s', 'p50'))}, HTTP {seconds(dig(six, 'http_s', 'p50'))} / "
        f"{seconds(dig(one, 'http_s', 'p50'))} on loopback; LTE (modelled) "
        f"{seconds(dig(six, 'tiers_s', 'lte'))} / {seconds(dig(one, 'tiers_s', 'lte'))}; paper "
        f"{seconds(six.get('paper_s'))} / {seconds(one.get('paper_s'))}",
        "—",
    )


def datafraction_row(d: Mapping[str, Any]) -> tuple[str, str, str]:
    curves = d.get("curves") or {}
    keep = (0.0, 0.02, 0.1, 0.25, 1.0)

    def points(arm: str) -> str:
        return " → ".join(
            f"{percent(p['device_accuracy']['mean'])} ({percent(p['fraction'])})"
            for p in curves.get(arm) or []
            if p["fraction"] in keep
        )

    n = dig(curves, "user", 0, "device_accuracy", "n")
    bank = d.get("bank") or {}
    world = (
        f"{num(bank.get('identities'))} identities, {num(dig(d, 'models', 0, 'user_train_rows'))}"
        " user features (expanded)"
        if d.get("scale") is not None
        else f"real bank, {num(bank.get('identities'))} identities"
    )
    system = curves.get("system") or []
    floor = None
    if system and curves.get("user"):
        v0 = system[0]["device_accuracy"]["mean"]
        floor = all(p["device_accuracy"]["mean"] >= v0 for p in system)
    spread = dig(curves, "user", -1, "vendor_spread", "mean")
    swa = dig(curves, "user+swa", -1, "vendor_spread", "mean")
    return (
        f"accuracy vs additional user data (Figure 4), {world}",
        f"devices' held-out accuracy, `user`: {points('user')}; `system`: {points('system')}; "
        f"vendor spread at 100% {num(spread)} (with SWA {num(swa)}); mean of n={num(n)} seeds; "
        f"{seconds(d.get('seconds'))} on {dig(d, 'conditions', 'machine', 'cores')} cores",
        f"system arm never below v0 {mark(floor)}",
    )


def expansion_row(d: Mapping[str, Any]) -> tuple[str, str, str]:
    full = dig(d, "summary", "1") or {}
    gap = full.get("twin_tested_on_real_gap")
    return (
        "feature-space expansion: heads on sampled features tested on real ones",
        f"at 100% of the user data: real {num(full.get('real'))}, twin "
        f"{num(full.get('twin_tested_on_real'))} (gap {num(gap, 2)}); a same-size world of new "
        f"identities {num(full.get('new_identities'))} "
        f"(gap {num(full.get('new_identities_gap'), 2)})",
        f"twin within 5 points {mark(None if gap is None else abs(gap) <= 0.05)}",
    )


def paper_job_row(d: Mapping[str, Any]) -> tuple[str, str, str]:
    path = d.get("data_path") or {}
    return (
        f"one job of {num(d.get('pushed_samples'))} pushed features ({num(d.get('train_samples'))}"
        f" trained × {d.get('epochs')} epochs, {num(d.get('val_samples'))} held out for "
        f"validation), {num(d.get('identities'))} identities, through the pipeline "
        f"({d.get('device')})",
        f"trigger → version {seconds(d.get('job_s'))}, of which training "
        f"{seconds(d.get('train_seconds'))}; cold log read + decode "
        f"{seconds(path.get('read_decode_s'))}; "
        f"accuracy {num(d.get('v0_device_accuracy'))} → {num(d.get('version_device_accuracy'))}",
        "paper: 231 s on a Titan Xp; H200: **not measured, no GPU was lent to this task**",
    )


def fedavg_row(d: Mapping[str, Any]) -> tuple[str, str, str]:
    task, summary, head = d.get("task") or {}, d.get("summary") or {}, d.get("headline") or {}
    ratio = head.get("bytes_ratio")
    targets = {t.get("kind"): t for t in summary.get("targets") or []}
    fedex_target = targets.get("fedex") or {}
    fp32 = dig(fedex_target, "fedavg", "float32", "bytes_ratio", "median")
    return (
        f"FedAvg vs FedEx, same task ({num(task.get('devices'))} devices x "
        f"{num(task.get('samples_per_device'))} fresh samples, {num(task.get('num_classes'))} "
        f"classes, {num(summary.get('seeds'))} seeds), bytes per device to FedEx's accuracy",
        f"FedEx {num(dig(summary, 'fedex', 'bytes_per_device', 'median'))} B (1 cycle, accuracy "
        f"{num(dig(summary, 'fedex', 'accuracy', 'median'))}); FedAvg {head.get('dtype', '?')}: "
        f"**median {num(ratio)}×** ({num(head.get('bytes_ratio_min'))}–"
        f"{num(head.get('bytes_ratio_max'))}, {num(head.get('reached'))}/{num(head.get('of'))} "
        f"seeds reached), fp32 {num(fp32)}×",
        f"FedEx ≤ 1/20 of FedAvg {mark(bool(d.get('meets_target')) if ratio else None)}",
    )


def chaos_row(d: Mapping[str, Any]) -> tuple[str, str, str]:
    runs = [r for rs in (d.get("scenarios") or {}).values() for r in rs]
    clean = sum(bool(r.get("clean")) for r in runs)
    names = ", ".join(f"{len(rs)} × `{k}`" for k, rs in (d.get("scenarios") or {}).items())
    return (
        f"exactly once under faults: {names} (see docs/benchmarks.md for the faults)",
        f"**`fedex audit` clean after {clean} of {len(runs)} runs**; samples acked per run "
        f"{num(min((dig(r, 'summary', 'samples') or 0 for r in runs), default=None))}–"
        f"{num(max((dig(r, 'summary', 'samples') or 0 for r in runs), default=None))}, "
        "each trained exactly once",
        f"clean {mark(clean == len(runs) if runs else None)}",
    )


def audit_row(d: Mapping[str, Any]) -> tuple[str, str, str]:
    a = d.get("audit_speed") or {}
    return (
        f"`fedex audit` on {num(a.get('samples'))} samples (synthetic deployment)",
        f"**{seconds(a.get('audit_seconds'))}** ({num(a.get('samples_per_s'))} samples/s)",
        f"< 1 min {mark(_lt(a.get('audit_seconds'), 60))}",
    )


ROWS: Final[list[tuple[str, Callable[[Mapping[str, Any]], tuple[str, str, str]]]]] = [
    ("codec", codec_row),
    ("kafka", kafka_row),
    ("pipeline", pipeline_row),
    ("pipeline", trigger_row),
    ("pipeline", update_row),
    ("train", train_row),
    ("fleet", fleet_row),
    ("fleet", fanout_row),
    ("fleet", big_fleet_row),
    ("push", push_row),
    ("datafraction", datafraction_row),
    ("datafraction-paper", datafraction_row),
    ("expansion", expansion_row),
    ("paper-job", paper_job_row),
    ("paper-job-paper", paper_job_row),
    ("fedavg", fedavg_row),
    ("chaos", chaos_row),
    ("chaos", audit_row),
]


def provenance_cell(result: Result) -> str:
    data = result.data or {}
    when = str(data.get("measured_at") or data.get("created_at") or "—")[:10]
    file = "train-cpu.json" if result.name == "train" else f"{result.name}.json"
    cell = f"`{file}` {when}, {commit_of(result)}"
    if result.stale:
        cell += f" — **stale**: {result.stale}"
    return cell


def rows(report: Report) -> list[list[str]]:
    out = []
    for name, row in ROWS:
        result = report.results[name]
        if result.data is None:
            out.append([name, f"`{result.command}`", f"**missing** — {result.missing}", "—", "—"])
            continue
        what, measured, target = row(result.data)
        out.append([what, f"`{result.command}`", measured, target, provenance_cell(result)])
    return out


def render(report: Report) -> str:
    return table(HEADERS, rows(report))


def update_readme(readme: Path, report: Report) -> bool:
    """Writes the table between the markers of ``readme``; returns whether it changed."""
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{readme} has no benchmark table markers ({BEGIN} … {END})")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{render(report)}\n{END}{tail}"
    if new != text:
        readme.write_text(new)
    return new != text


def committed_table(readme: Path) -> str:
    """The table as the README holds it (without its staleness marks)."""
    text = readme.read_text()
    block = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    return STALE_MARK.sub("", block)
