"""The chaos section of ``docs/benchmarks.md``: exactly once under faults
(``fedex bench chaos``). Pure: strings out."""

from __future__ import annotations

from collections.abc import Mapping

from lab.report_data import Report, num, open_section, seconds, table


def section_chaos(report: Report) -> str:
    r = report.results["chaos"]
    out, d = open_section(r, "Exactly once under faults")
    if d is None:
        return out
    out += (
        "Each run starts its own broker, the worker and the trainer as supervised children "
        "(as `fedex up` does) and load: `age` = 4 models × 20 devices of built-in pushers at "
        "25 pushes/s for 150 s, no fault; `kill` = a 1,000-device `fedex devices` fleet on 2 "
        "models, the broker SIGKILLed for 37 s; `full` = the fleet for 180 s with a trainer "
        "kill, a 37-s broker kill, a worker kill and a 20-s broker pause. Age triggers fire "
        "every 2 s. After the load the system settles and `fedex audit` reads the topics "
        "([invariants.md](invariants.md)). *copies* = re-sent pushes' samples (devices "
        "re-send until acknowledged); *trained* = distinct samples in a published version.\n\n"
    )
    rows = []
    for name, runs in (d.get("scenarios") or {}).items():
        for i, run in enumerate(runs):
            s = run.get("summary", {})
            logs = run.get("logs", {})
            lost = sum(v.get("lost", 0) for v in logs.values())
            lines = sum(v.get("lines", 0) for v in logs.values())
            rows.append(
                [
                    f"{name} #{i + 1}",
                    "clean" if run.get("clean") else f"{num(s.get('violations'))} violations",
                    "yes" if run.get("settled") else "no",
                    num(s.get("pushes")),
                    num(s.get("distinct")),
                    num(s.get("copies")),
                    num(s.get("trained_samples")),
                    num(s.get("versions")),
                    ", ".join(f"{k} {v}" for k, v in (run.get("restarts") or {}).items()),
                    f"{num(lost)} / {num(lines)}",
                    seconds(run.get("wall_seconds")),
                ]
            )
    out += table(
        [
            "run",
            "audit",
            "settled",
            "pushes",
            "samples",
            "copies",
            "trained",
            "versions",
            "restarts",
            "outage lines / log lines",
            "wall",
        ],
        rows,
    )
    speed = d.get("audit_speed")
    if isinstance(speed, Mapping):
        out += (
            f"\n\nAudit speed: {num(speed.get('samples'))} samples in "
            f"{num(speed.get('pushes'))} pushes, {num(speed.get('triggers'))} triggers, "
            f"audited in {seconds(speed.get('audit_seconds'))} "
            f"({num(speed.get('samples_per_s'))} samples/s; "
            f"{'clean' if speed.get('clean') else 'NOT clean'}) on a synthetic deployment "
            "consistent by construction (target: 1 M samples in under a minute)."
        )
    commit = d.get("commit")
    if commit:
        out += f"\n\nMeasured at commit `{str(commit)[:10]}`{' (dirty)' if d.get('dirty') else ''}."
    return out + f"\n\nReproduce: `{r.command}`."
