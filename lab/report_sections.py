"""The sections of ``docs/benchmarks.md``, one function per table, from the loaded result
files (:class:`lab.report.Report`). Pure: strings out, nothing read or written."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lab.measure import describe
from lab.report_data import (
    GPU_COMMAND,
    Report,
    Result,
    commit_of,
    dig,
    flatten,
    missing_note,
    num,
    open_section,
    percent,
    provenance,
    seconds,
    stale_note,
    table,
)

# --------------------------------------------------------------------------- sections


def section_runs(report: Report) -> str:
    rows = []
    for r in [*report.results.values(), *report.gpu]:
        when, machine, load = provenance(r)
        run = r.run or {}
        status = "ok" if r.ok else "missing"
        if run.get("status") == "failed":
            status = "last run failed" + ("; older result shown" if r.ok else "")
        if run.get("seconds"):
            status += f" ({num(float(run['seconds']), 3)} s)"
        if r.stale and r.ok:  # last in the cell: the stale mark runs to the cell's end
            status += f"; **stale**: {r.stale}"
        rows.append([r.name, status, when, commit_of(r), machine, load, f"`{r.command}`"])
    return "## Runs\n\n" + table(
        [
            "benchmark",
            "status",
            "measured at",
            "commit",
            "machine",
            "load before → after (1/5/15 min)",
            "reproduce",
        ],
        rows,
    )


def section_train(report: Report, img: str | None) -> str:
    cpu = report.results["train"]
    head = "## Table 1 analog: head training throughput per freeze level\n\n"
    head += (
        "The recipe's own training step (AdamW, cross-entropy) on the thawed layers of "
        "InceptionResnetV1 for 8,631 classes, synthetic features of the level's shape "
        "(`lab/train_bench.py`). The paper's column is its server (Titan Xp) in images/s.\n\n"
    )
    if not cpu.ok:
        head += missing_note(cpu) + "\n\n"
    gpu = report.gpu[-1] if report.gpu else None
    levels: dict[str, dict[str, Any]] = {}
    for source, result in (("cpu", cpu), ("gpu", gpu)):
        for row in dig(result.data if result else None, "levels") or []:
            levels.setdefault(row["level"], {})[source] = row
    rows = []
    for level, by in levels.items():
        any_row = by.get("cpu") or by.get("gpu") or {}
        rows.append(
            [
                level,
                "×".join(str(d) for d in any_row.get("feature_shape", [])),
                num(any_row.get("paper_img_per_s")),
                num(dig(by, "cpu", "samples_per_s")),
                num(dig(by, "cpu", "vs_paper")),
                percent(dig(by, "cpu", "utilisation")),
                num(dig(by, "gpu", "samples_per_s")),
                num(dig(by, "gpu", "vs_paper")),
            ]
        )
    body = head + stale_note(cpu)
    if rows:
        body += table(
            [
                "level",
                "features",
                "paper img/s (Titan Xp)",
                "CPU samples/s",
                "CPU × paper",
                "CPU util. of sgemm (exact FLOPs)",
                "GPU samples/s",
                "GPU × paper",
            ],
            rows,
        )
    if cpu.ok:
        env = cpu.data.get("environment", {}) if cpu.data else {}
        cfg, peak = dig(cpu.data, "config") or {}, dig(cpu.data, "peak") or {}
        _, _, load = provenance(cpu)
        body += (
            f"\n\nCPU: {env.get('device_name', '?')}, {env.get('threads', '?')} threads, "
            f"torch {env.get('torch', '?')}; load {load}. Each level: the median of "
            f"{num(cfg.get('rounds'))} rounds, each a ceiling window then a training slice; "
            f"utilisation = exact FLOPs/sample ({cfg.get('flops_convention', '?')}) x samples/s "
            f"÷ the best of {num(peak.get('windows'))} ceiling windows of the run "
            f"({num((peak.get('min_flops_per_s') or 0) / 1e9)}–"
            f"{num((peak.get('flops_per_s') or 0) / 1e9)} GFLOP/s). Reproduce: `{cpu.command}`."
        )
    if gpu is not None and gpu.data is not None:
        env = gpu.data.get("environment", {})
        body += (
            f"\n\nGPU: {env.get('device_name', '?')} ({gpu.name}.json, "
            f"{gpu.data.get('created_at', '?')}). Reproduce on the accelerator: `{GPU_COMMAND}`."
        )
    else:
        body += (
            "\n\nGPU: **no GPU lent** — no `bench/results/train-*.json` from a CUDA device; the "
            f"GPU columns stay empty until one is run (`{GPU_COMMAND}`)."
        )
    if img:
        body += f"\n\n![training throughput per freeze level]({img})"
    return body


def tiers_of(data: Mapping[str, Any]) -> list[str]:
    return [str(t["name"]) for t in data.get("tiers", [])]


def section_push(report: Report, img: str | None) -> str:
    r = report.results["push"]
    out, data = open_section(r, "Table 2 analog: push and pull latency per freeze level")
    if data is None:
        return out
    tiers = tiers_of(data)
    cfg = data.get("config", {})
    out += (
        f"A real {cfg.get('samples_per_push', 10)}-sample {cfg.get('dtype', 'float16')} "
        "feature push per level, encoded by the codec; **measured** on loopback as a Kafka "
        "produce (acks=all) and as an HTTP POST to the model server (which produces it with "
        "acks=all), p50 of "
        f"n={cfg.get('repeats', '?')} pushes each, Kafka and HTTP in alternation after two "
        "untimed pushes of each. **Modelled** per network tier: "
        f"{data.get('model', '')}.\n\n"
    )
    out += "### Push of 10 features\n\n" + table(
        [
            "level",
            "features",
            "bytes",
            "Kafka acks=all p50 (measured)",
            "HTTP p50 (measured)",
            *(f"{t} (modelled)" for t in tiers),
            "paper",
        ],
        [
            [
                row["level"],
                "×".join(str(d) for d in row.get("feature_shape", [])),
                num(row.get("push_bytes")),
                seconds(dig(row, "kafka_s", "p50")),
                seconds(dig(row, "http_s", "p50")),
                *(seconds(dig(row, "tiers_s", t)) for t in tiers),
                seconds(row.get("paper_s")),
            ]
            for row in data.get("levels", [])
        ],
    )
    out += (
        f"\n\n### Pull of the checkpoint\n\nA real GET of each level's head (and of the whole "
        f"model, `full`) from the model server, sha256-verified, p50 of "
        f"n={cfg.get('pull_repeats', '?')} after one untimed pull; "
        f"{cfg.get('num_classes', '?')} classes, fp16 "
        "safetensors.\n\n"
    )
    out += table(
        ["level", "bytes", "HTTP p50 (measured)", *(f"{t} (modelled)" for t in tiers), "paper"],
        [
            [
                row["level"],
                num(row.get("checkpoint_bytes")),
                seconds(dig(row, "http_s", "p50")),
                *(seconds(dig(row, "tiers_s", t)) for t in tiers),
                seconds(row.get("paper_s")),
            ]
            for row in data.get("pull", [])
        ],
    )
    out += fedavg_push_part(data, tiers)
    if img:
        out += f"\n\n![push and pull latency per freeze level and tier]({img})"
    return out + f"\n\nReproduce: `{r.command}`."


def fedavg_push_part(data: Mapping[str, Any], tiers: list[str]) -> str:
    """The FedAvg push table and the network tiers' configuration."""
    fedavg = data.get("fedavg_push")
    out = "\n\n### FedAvg push (one device, one round)\n\n"
    if isinstance(fedavg, list) and fedavg:
        out += (
            "The encoded gradient record (`codec.encode_round_update`) of the thawed layers' "
            "floating tensors; tier time is the simulated transfer only.\n\n"
        )
        out += table(
            ["thawed layers", "dtype", "bytes", *(f"{t} (modelled)" for t in tiers), "paper"],
            [
                [
                    row["level"],
                    row.get("dtype", "?"),
                    num(row.get("bytes")),
                    *(seconds(dig(row, "tiers_s", t)) for t in tiers),
                    seconds(row.get("paper_s")),
                ]
                for row in fedavg
            ],
        )
    else:
        reason = dig(fedavg, "reason") or "push.json has no FedAvg push rows"
        out += f"**Pending** — {reason}."
    out += "\n\nNetwork tiers (configuration of `device_sim/network.py`, not measurements):\n\n"
    out += table(
        ["tier", "up Mbit/s", "down Mbit/s", "RTT ms", "loss"],
        [
            [t["name"], num(t["up_mbps"]), num(t["down_mbps"]), num(t["rtt_ms"]), num(t["loss"])]
            for t in data.get("tiers", [])
        ],
    )
    return out


def section_transport(report: Report) -> str:
    codec, kafka = report.results["codec"], report.results["kafka"]
    out = "## Transport: codec and raw Kafka\n\n"
    rows = []
    if codec.ok:
        for row in dig(codec.data, "rows") or []:
            rows.append(
                [
                    f"codec decode, {row['cut']} {row['dtype']}",
                    f"{num(row['decode_samples_s'])} samples/s ({num(row['push_bytes'])} B)",
                    f"`{codec.command}`",
                ]
            )
    else:
        rows.append(["codec", missing_note(codec), f"`{codec.command}`"])
    if kafka.ok:
        k = kafka.data or {}
        rows.append(
            [
                "raw aiokafka produce→consume, freeze6 10-sample pushes, 50 keys on 6 partitions",
                f"median {num(k.get('samples_s_median', k.get('samples_s')))} samples/s over "
                f"{num(k.get('repeats', len(k.get('runs', []))))} runs after a warm-up run "
                f"({num(k.get('samples_s_min'))}–{num(k.get('samples_s_best'))}; "
                f"{num(k.get('mb_s_median', k.get('mb_s')))} MB/s)",
                f"`{kafka.command}`",
            ]
        )
    else:
        rows.append(["raw Kafka", missing_note(kafka), f"`{kafka.command}`"])
    return out + table(["what", "measured", "reproduce"], rows)


def find(data: Any, *words: str) -> list[tuple[str, Any]]:
    return [(k, v) for k, v in flatten(data, limit=400) if all(w in k.lower() for w in words)]


def pipeline_rows(p: Result) -> list[list[Any]]:
    """Ingestion ratio (interleaved pairs) and the latency distributions, each with its n."""
    a = (p.data or {}).get("agents", {})
    u = (p.data or {}).get("update", {})
    tp = a.get("throughput") or {}
    cold = tp.get("cold_ratio")
    broker = dig(p.data, "conditions", "broker", "source") or "?"
    ratio = (
        f"agents {num(a.get('agents_samples_s'))} vs raw {num(a.get('raw_kafka_samples_s'))} "
        f"samples/s (medians): **ratio {num(tp.get('ratio_median'))}** (median of "
        f"{num(tp.get('pairs'))} interleaved pairs, {num(tp.get('ratio_min'))}–"
        f"{num(tp.get('ratio_max'))}); warm-up pair {num(cold)}; broker {broker}"
    )
    sustained = a.get("sustained") or {}
    return [
        ["ingestion: agents vs raw Kafka, same records", ratio],
        ["trigger latency, idle worker", describe(a.get("idle_trigger_latency_s"))],
        [
            f"trigger latency, sustained load ({num(sustained.get('pushes_s'))} pushes/s)",
            describe(sustained.get("trigger_latency_s")),
        ],
        ["trigger latency, flood (includes the backlog)", describe(a.get("trigger_latency_s"))],
        [
            f"update latency (trigger → model update, {u.get('device', '?')}, "
            f"{u.get('num_classes', '?')} classes; {num(u.get('warmup_jobs'))} warm-up job apart)",
            describe(u.get("update_latency_s")),
        ],
    ]


def section_pipeline(report: Report) -> str:
    p, fleet = report.results["pipeline"], report.results["fleet"]
    out = "## Pipeline\n\n" + stale_note(p)
    rows: list[list[Any]] = []
    if p.ok and p.data is not None:
        rows += [[what, value, f"`{p.command}`"] for what, value in pipeline_rows(p)]
    else:
        rows.append(["ingestion, trigger and update latency", missing_note(p), f"`{p.command}`"])
    fan = dig(fleet.data, "fanout")
    specific = {
        "fan-out": (
            f"model update → head swapped, per device of {num(fan.get('devices'))} over "
            f"{num(fan.get('updates'))} versions, transfer {fan.get('transfer', '?')}: "
            f"{describe(fan.get('per_device_from_ack_s'))}"
            if isinstance(fan, Mapping) and "per_device_from_ack_s" in fan
            else None
        ),
        "freshness": main_job_freshness(report.main_job),
        "fleet density": fleet_density(fleet.data) if fleet.ok else None,
    }
    for label, words in (
        ("fan-out", ("fan",)),
        ("freshness", ("fresh",)),
        ("fleet density", ("densit",)),
    ):
        found = find(fleet.data, *words) if fleet.ok else []
        if specific[label]:
            value = str(specific[label])
        elif found:
            value = "; ".join(f"{k} = {num(v)}" for k, v in found[:4])
        elif fleet.ok:
            value = f"**missing** — fleet.json has no {label} field"
        else:
            value = missing_note(fleet)
        command = "make demo" if label == "freshness" and specific[label] else fleet.command
        rows.append([label, value, f"`{command}`"])
    return out + table(["metric", "measured", "reproduce"], rows)


def section_generic(report: Report, name: str, title: str) -> str:
    r = report.results[name]
    out, data = open_section(r, title)
    if data is None:
        return out
    skip = {"benchmark", "measured_at", "machine", "created_at", "environment"}
    body = {k: v for k, v in data.items() if k not in skip}
    rows = [[f"`{k}`", num(v)] for k, v in flatten(body)]
    return out + table(["field", "value"], rows) + f"\n\nReproduce: `{r.command}`."


def main_job_freshness(data: Mapping[str, Any] | None) -> str | None:
    """Freshness of the last main job: label → the model that includes it is active on the
    device that pushed it, in simulated time (devices push only while charging or idle)."""
    fresh = dig(dig(data, "fleet") or {}, "freshness", "sim_s")
    if not isinstance(fresh, Mapping) or not fresh.get("n"):
        return None
    return (
        f"label → model with it active on the device: p50 {fresh['p50'] / 3600:.1f} h, "
        f"p99 {fresh['p99'] / 3600:.1f} h of simulated time over {num(fresh['n'])} pushes "
        f"(main job: {num(data.get('devices') if data else None)} devices; devices push "
        "only in their charging/idle windows)"
    )


def fleet_density(data: Mapping[str, Any] | None) -> str | None:
    """Devices per process and memory per device, from the fleet's measured RSS."""
    one, multi = dig(data, "one_process") or {}, dig(data, "multi_process") or {}
    parts = []
    if one.get("devices") and one.get("rss_peak_mb"):
        per = one["rss_peak_mb"] * 1024 / one["devices"]
        parts.append(
            f"{num(one['devices'])} devices in one process at {num(one['rss_peak_mb'])} MB peak "
            f"RSS ({num(per)} KB/device)"
        )
    if multi.get("devices") and multi.get("processes"):
        parts.append(
            f"{num(multi['devices'])} devices in {num(multi['processes'])} processes, "
            f"{num(multi.get('rss_total_mb'))} MB RSS in all"
        )
    return "; ".join(parts) or None


def section_fleet(report: Report) -> str:
    r = report.results["fleet"]
    out, d = open_section(r, "Fleet")
    if d is None:
        return out
    known = [k for k in ("one_process", "multi_process", "fanout") if k in d]
    if not known:
        return section_generic(report, "fleet", "Fleet")
    rows = []
    for label, key in (("one process", "one_process"), ("many processes", "multi_process")):
        s = d.get(key)
        if not isinstance(s, Mapping):
            continue
        lag = dig(s, "loop_lag_ms", "p99") or s.get("loop_lag_p99_max_ms")
        n = dig(s, "loop_lag_ms", "n")
        rows.append(
            [
                label,
                num(s.get("devices")),
                num(s.get("processes", 1)),
                num(s.get("rss_peak_mb") or s.get("rss_max_mb")),
                num(s.get("rss_steady_mb")),
                num(s.get("rss_total_mb", s.get("rss_peak_mb"))),
                (f"{num(lag)} ms" + (f" (n={num(n)})" if n else "")) if lag is not None else "—",
                num(dig(s, "sustained", "pushes_s")),
                num(dig(s, "sustained", "samples_s")),
            ]
        )
    out += table(
        [
            "run",
            "devices",
            "processes",
            "peak RSS/process MB, VmHWM (max)",
            "steady RSS MB",
            "RSS total MB",
            "loop lag p99",
            "sustained pushes/s",
            "samples/s",
        ],
        rows,
    )
    for key, label in (
        ("fanout", "with each device's download"),
        ("fanout_transfer_off", "transfer off"),
    ):
        fan = d.get(key)
        if not isinstance(fan, Mapping):
            continue
        out += (
            f"\n\nFan-out {label}: {num(fan.get('updates'))} versions to "
            f"{num(fan.get('devices'))} devices ({fan.get('source', '?')} checkpoints of "
            f"{num(fan.get('checkpoint_bytes'))} B, transfer {fan.get('transfer', '?')}). Per "
            f"device, broker ack → head swapped: {describe(fan.get('per_device_from_ack_s'))}; "
            f"to 99% of the devices, per version: {describe(fan.get('fanout_from_ack_s'))}."
        )
    density = fleet_density(d)
    if density:
        out += f"\n\nDensity: {density}."
    return out + f"\n\nReproduce: `{r.command}`."
