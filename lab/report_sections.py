"""The sections of ``docs/benchmarks.md``, one function per table, from the loaded result
files (:class:`lab.report.Report`). Pure: strings out, nothing read or written."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lab.report_data import (
    GPU_COMMAND,
    Report,
    Result,
    dig,
    flatten,
    num,
    percent,
    provenance,
    seconds,
    table,
)


def missing_note(result: Result) -> str:
    return f"**Missing** — {result.missing}."


def stale_note(result: Result) -> str:
    if result.run and result.run.get("status") == "failed" and result.data is not None:
        return (
            f"\n\n> The last run of `{result.command}` failed ({result.run.get('reason')}); "
            "the numbers below are from the earlier result file.\n"
        )
    return ""


# --------------------------------------------------------------------------- sections


def section_runs(report: Report) -> str:
    rows = []
    for r in [*report.results.values(), *report.gpu]:
        when, machine, load = provenance(r)
        run = r.run or {}
        status = "ok" if r.ok else "missing"
        if run.get("status") == "failed":
            status = "last run failed" + ("; older result shown" if r.ok else "")
        took = f" ({num(float(run['seconds']), 3)} s)" if run.get("seconds") else ""
        rows.append([r.name, status + took, when, machine, load, f"`{r.command}`"])
    return "## Runs\n\n" + table(
        ["benchmark", "status", "measured at", "machine", "load (1/5/15 min)", "reproduce"], rows
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
                "CPU util. of sgemm",
                "GPU samples/s",
                "GPU × paper",
            ],
            rows,
        )
    if cpu.ok:
        env = cpu.data.get("environment", {}) if cpu.data else {}
        body += (
            f"\n\nCPU: {env.get('device_name', '?')}, {env.get('threads', '?')} threads, "
            f"torch {env.get('torch', '?')}; load {num(env.get('loadavg_start'))} → "
            f"{num(env.get('loadavg_end'))}. Reproduce: `{cpu.command}`."
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
    out = "## Table 2 analog: push and pull latency per freeze level\n\n"
    if not r.ok or r.data is None:
        return out + missing_note(r)
    data = r.data
    tiers = tiers_of(data)
    cfg = data.get("config", {})
    out += stale_note(r)
    out += (
        f"A real {cfg.get('samples_per_push', 10)}-sample {cfg.get('dtype', 'float16')} "
        "feature push per level, encoded by the codec; **measured** on loopback as a Kafka "
        "produce (acks=all) and as an HTTP POST to the model server (which produces it with "
        "acks=all), p50 of "
        f"{cfg.get('repeats', '?')} sequential pushes. **Modelled** per network tier: "
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
        f"{cfg.get('pull_repeats', '?')}; {cfg.get('num_classes', '?')} classes, fp16 "
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
    fedavg = data.get("fedavg_push")
    out += "\n\n### FedAvg push (one device, one round)\n\n"
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
    if img:
        out += f"\n\n![push and pull latency per freeze level and tier]({img})"
    return out + f"\n\nReproduce: `{r.command}`."


def section_datafraction(report: Report, img: str | None) -> str:
    r = report.results["datafraction"]
    out = "## Figure 4 analog: accuracy vs fraction of additional user data\n\n"
    if not r.ok or r.data is None:
        return out + missing_note(r)
    data = r.data
    bank = data.get("bank", {})
    recipe = data.get("recipe", {})
    out += stale_note(r)
    out += (
        f"Base head v0 trained on the pre-training identities, then retrained from v0 on a "
        f"fraction of the devices' training features; accuracy on the devices' held-out "
        f"features. Bank `{bank.get('file', '?')}` ({bank.get('backbone', '?')} at "
        f"{bank.get('cut', '?')}), {len(data.get('seeds', []))} seeds (mean ± std over seeds, "
        f"models averaged), {recipe.get('epochs', '?')} epochs AdamW lr {recipe.get('lr', '?')} "
        f"for every head. Arms: `user` = retrained on the user data alone (what the trainer "
        f"does), `pretrain+user` = on the pre-training data plus the user data. 0% is v0.\n\n"
    )
    if img:
        out += f"![accuracy vs fraction of additional data]({img})\n\n"
    curves = data.get("curves", {})
    arms = list(curves)
    fractions = [row["fraction"] for row in curves[arms[0]]] if arms else []
    rows = []
    for i, f in enumerate(fractions):
        row: list[Any] = [f"{f:.0%}", num(dig(curves, arms[0], i, "user_samples"))]
        for arm in arms:
            acc = dig(curves, arm, i, "device_accuracy") or {}
            pre = dig(curves, arm, i, "pretrain_accuracy") or {}
            row += [f"{num(acc.get('mean'))} ± {num(acc.get('std'), 2)}", num(pre.get("mean"))]
        rows.append(row)
    headers = ["fraction", "user samples"]
    for arm in arms:
        headers += [f"{arm}: device acc", f"{arm}: pre-train acc"]
    return out + table(headers, rows) + f"\n\nReproduce: `{r.command}`."


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
        rows.append(
            [
                "raw aiokafka produce→consume, freeze6 10-sample pushes",
                f"{num(dig(kafka.data, 'samples_s'))} samples/s "
                f"({num(dig(kafka.data, 'mb_s'))} MB/s)",
                f"`{kafka.command}`",
            ]
        )
    else:
        rows.append(["raw Kafka", missing_note(kafka), f"`{kafka.command}`"])
    return out + table(["what", "measured", "reproduce"], rows)


def find(data: Any, *words: str) -> list[tuple[str, Any]]:
    return [(k, v) for k, v in flatten(data, limit=400) if all(w in k.lower() for w in words)]


def section_pipeline(report: Report) -> str:
    p, fleet = report.results["pipeline"], report.results["fleet"]
    out = "## Pipeline\n\n" + stale_note(p)
    rows: list[list[Any]] = []
    if p.ok and p.data is not None:
        a = p.data.get("agents", {})
        u = p.data.get("update", {})
        rows += [
            [
                "ingestion: samples/s through the agents vs raw Kafka (same run)",
                f"{num(a.get('samples_s'))} vs {num(a.get('raw_kafka_samples_s'))}: "
                f"**ratio {num(a.get('ratio_to_raw_kafka'))}**",
                f"`{p.command}`",
            ],
            [
                "trigger latency p50 / p99: idle",
                f"{seconds(dig(a, 'idle_trigger_latency_s', 'p50'))} / "
                f"{seconds(dig(a, 'idle_trigger_latency_s', 'p99'))}",
                f"`{p.command}`",
            ],
            [
                "trigger latency p50 / p99: sustained load",
                f"{seconds(dig(a, 'sustained', 'trigger_latency_s', 'p50'))} / "
                f"{seconds(dig(a, 'sustained', 'trigger_latency_s', 'p99'))}",
                f"`{p.command}`",
            ],
            [
                "trigger latency p50 / p99: flood (backlog)",
                f"{seconds(dig(a, 'trigger_latency_s', 'p50'))} / "
                f"{seconds(dig(a, 'trigger_latency_s', 'p99'))}",
                f"`{p.command}`",
            ],
            [
                f"update latency p50 / p99 (trigger → model update, {u.get('device', '?')}, "
                f"{u.get('num_classes', '?')} classes)",
                f"{seconds(dig(u, 'update_latency_s', 'p50'))} / "
                f"{seconds(dig(u, 'update_latency_s', 'p99'))}",
                f"`{p.command}`",
            ],
        ]
    else:
        rows.append(["ingestion, trigger and update latency", missing_note(p), f"`{p.command}`"])
    fan = dig(fleet.data, "fanout")
    specific = {
        "fan-out": (
            f"model update → every one of {num(fan.get('devices'))} devices: p50 "
            f"{seconds(dig(fan, 'fanout_from_ack_s', 'p50'))}, p99 "
            f"{seconds(dig(fan, 'fanout_from_ack_s', 'p99'))} from the broker's ack"
            if isinstance(fan, Mapping) and "fanout_from_ack_s" in fan
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
    out = f"## {title}\n\n" + stale_note(r)
    if not r.ok:
        return out + missing_note(r)
    skip = {"benchmark", "measured_at", "machine", "created_at", "environment"}
    body = {k: v for k, v in (r.data or {}).items() if k not in skip}
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
    out = "## Fleet\n\n" + stale_note(r)
    if not r.ok or r.data is None:
        return out + missing_note(r)
    d = r.data
    known = [k for k in ("one_process", "multi_process", "fanout") if k in d]
    if not known:
        return section_generic(report, "fleet", "Fleet")
    rows = []
    for label, key in (("one process", "one_process"), ("many processes", "multi_process")):
        s = d.get(key)
        if not isinstance(s, Mapping):
            continue
        lag = dig(s, "loop_lag_ms", "p99") or s.get("loop_lag_p99_max_ms")
        rows.append(
            [
                label,
                num(s.get("devices")),
                num(s.get("processes", 1)),
                num(s.get("rss_peak_mb") or s.get("rss_max_mb")),
                num(s.get("rss_total_mb", s.get("rss_peak_mb"))),
                f"{num(lag)} ms" if lag is not None else "—",
                num(dig(s, "sustained", "pushes_s")),
                num(dig(s, "sustained", "samples_s")),
            ]
        )
    out += table(
        [
            "run",
            "devices",
            "processes",
            "RSS/process MB (max)",
            "RSS total MB",
            "loop lag p99",
            "sustained pushes/s",
            "samples/s",
        ],
        rows,
    )
    fan = d.get("fanout")
    if isinstance(fan, Mapping):
        out += (
            f"\n\nFan-out of {num(fan.get('updates'))} model versions to "
            f"{num(fan.get('devices'))} devices ({fan.get('source', '?')} checkpoints of "
            f"{num(fan.get('checkpoint_bytes'))} B): from the broker's ack, p50 "
            f"{seconds(dig(fan, 'fanout_from_ack_s', 'p50'))}, p99 "
            f"{seconds(dig(fan, 'fanout_from_ack_s', 'p99'))}; from the version's creation, "
            f"p99 {seconds(dig(fan, 'fanout_from_create_s', 'p99'))}."
        )
    density = fleet_density(d)
    if density:
        out += f"\n\nDensity: {density}."
    return out + f"\n\nReproduce: `{r.command}`."


def section_fedavg(report: Report, img: str | None) -> str:
    r = report.results["fedavg"]
    out = "## FedAvg baseline vs FedEx\n\n" + stale_note(r)
    if not r.ok or r.data is None:
        return out + missing_note(r)
    d = r.data
    if not isinstance(d.get("fedex"), Mapping) or not isinstance(d.get("fedavg"), Mapping):
        return section_generic(report, "fedavg", "FedAvg baseline vs FedEx")
    task = d.get("task", {})
    out += (
        f"Same task for both arms: {num(task.get('devices'))} devices x "
        f"{num(task.get('samples_per_device'))} samples, {num(task.get('num_classes'))} "
        f"classes, {task.get('backbone', '?')} at {task.get('cut', '?')}; v0 accuracy "
        f"{num(task.get('base_accuracy'))} ({task.get('evaluation', '')}). Bytes are real "
        "encoded message sizes.\n\n"
    )
    rows = []
    for name, arm in (("FedEx", d["fedex"]), ("FedAvg", d["fedavg"])):
        compute = arm.get("device_compute_seconds_per_device")
        rows.append(
            [
                name,
                num(arm.get("accuracy")),
                num(arm.get("rounds")),
                num(dig(arm, "bytes_up_per_device", "mean")),
                num(dig(arm, "bytes_down_per_device", "mean")),
                num(dig(arm, "bytes_per_device", "mean")),
                seconds(compute.get("mean") if isinstance(compute, Mapping) else compute),
                seconds(arm.get("wall_seconds")),
            ]
        )
    out += table(
        [
            "arm",
            "accuracy",
            "rounds",
            "B up/device",
            "B down/device",
            "B/device",
            "device compute",
            "wall",
        ],
        rows,
    )
    met = "met" if d.get("meets_target") else "not met"
    out += (
        f"\n\nBytes per device, FedAvg / FedEx: **{num(d.get('bytes_ratio_fedavg_over_fedex'))}"
        f"** (target ≥ {num(d.get('target_ratio'))}: {met}; FedAvg "
        f"{'reached' if dig(d, 'fedavg', 'reached') else 'did not reach'} FedEx's accuracy)."
    )
    cost = dig(d, "fedavg", "cost_to_reach") or []
    if cost:
        out += "\n\n" + table(
            ["tolerance", "accuracy needed", "FedAvg round", "B/device", "× FedEx", "wall"],
            [
                [
                    num(c.get("tolerance")),
                    num(c.get("accuracy_needed")),
                    num(c.get("round")) if c.get("round") is not None else "not reached",
                    num(c.get("bytes_per_device")),
                    num(c.get("ratio")),
                    seconds(c.get("wall_seconds")),
                ]
                for c in cost
            ],
        )
    if img:
        out += f"\n\n![FedAvg accuracy vs bytes per device, FedEx as a point]({img})"
    return out + f"\n\nReproduce: `{r.command}`."
