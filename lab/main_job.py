"""The main job (``make demo`` / ``fedex demo``): the whole system on the embedded default stack.

1. Kafka: the local broker from the Maven jars (or ``FEDEX_KAFKA_BOOTSTRAP``), topics ensured.
   Every run gets its own topic prefix, so runs never mix.
2. The world: the feature bank of the default world (the real InceptionResnetV1 prefix at
   freeze6 on generated faces; built once into ``$FEDEX_HOME/banks``, later runs load it)
   and each model's base head ``v0``, trained on the pre-training identities only.
3. The cloud as supervised child processes, as ``fedex up`` runs them: the aggregation
   worker, a trainer and the model server (logs in ``$FEDEX_HOME/logs``).
4. The fleet: ``devices`` simulated phones over ``models`` models for ``duration`` wall
   seconds (a simulated day every 3 minutes), pushing feedback, pulling every new best
   version, re-measuring their accuracy on their own held-out data.
5. The report: per model the versions shipped with their validation accuracy and the
   devices' mean accuracy before and after each; freshness; samples ingested; bytes and
   energy per device; the training jobs and their durations. Also written as JSON to
   ``bench/results/demo.json`` (``--out``).
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from rich.console import Console
from rich.table import Table

from device_sim.fleet import FleetConfig, run_fleet
from device_sim.fleet_config import FleetSchedule
from device_sim.report import FleetProgress, write_json
from pipeline.records import ModelUpdate
from pipeline.settings import Settings

if TYPE_CHECKING:
    from pipeline.supervisor import Supervisor

#: What the README's first command runs.
DEVICES = 1000
MODELS = 2
DURATION_S = 180.0


@dataclass(frozen=True, slots=True)
class TrainingJob:
    """One version the trainer published, as the model topic announced it."""

    model_id: str
    version: str
    parent_version: str | None
    is_best: bool
    val_accuracy: float
    champion_val_accuracy: float | None
    train_samples: int
    val_samples: int
    train_seconds: float
    at_s: float

    @classmethod
    def of(cls, update: ModelUpdate, at_s: float) -> TrainingJob:
        m = update.metrics
        return cls(
            model_id=update.model_id,
            version=update.version,
            parent_version=update.parent_version,
            is_best=update.is_best,
            val_accuracy=m.val_accuracy,
            champion_val_accuracy=m.champion_val_accuracy,
            train_samples=m.train_samples,
            val_samples=m.val_samples,
            train_seconds=m.train_seconds,
            at_s=at_s,
        )


@dataclass(slots=True)
class MainJobReport:
    devices: int
    models: list[str]
    wall_s: float = 0.0
    prepare_s: float = 0.0
    jobs: list[TrainingJob] = field(default_factory=list)
    fleet: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "devices": self.devices,
            "models": self.models,
            "wall_s": self.wall_s,
            "prepare_s": self.prepare_s,
            "jobs": [asdict(j) for j in self.jobs],
            "fleet": self.fleet,
        }


# --------------------------------------------------------------------------- running


async def run_main_job(
    settings: Settings,
    *,
    devices: int = DEVICES,
    models: int = MODELS,
    duration_s: float = DURATION_S,
    console: Console | None = None,
    stop_event: asyncio.Event | None = None,
    fleet_config: FleetConfig | None = None,
) -> MainJobReport:
    """Run the whole system once and return its report (see the module docstring).
    ``fleet_config`` replaces the fleet built from ``devices`` / ``models`` /
    ``duration_s`` (tests run a tiny world that way)."""
    from pipeline.kafka_local import free_port
    from pipeline.registry import RegistryFollower
    from pipeline.stack import stack_for
    from pipeline.topics import Topics

    console = console or Console()
    started = time.monotonic()
    settings = _job_settings(settings, free_port())
    config = replace(
        fleet_config
        or FleetConfig(count=devices, models=models, schedule=FleetSchedule(duration_s=duration_s)),
        register=False,  # done below, before the cloud starts
    )
    model_ids = list(config.world_config().models)
    report = MainJobReport(devices=config.count, models=model_ids)
    async with stack_for(settings) as live:
        assert live.kafka_bootstrap is not None
        console.rule(f"FedEx Stream main job — Kafka at {live.kafka_bootstrap}")
        await _register_base_heads(live, config, model_ids, console)
        supervisor = _cloud(live, console)
        follower = RegistryFollower(
            bootstrap=live.kafka_bootstrap,
            topic=Topics(live.topic_prefix).models,
            on_update=_job_announcer(report, console, started),
            client_id="fedex-demo",
        )
        report.prepare_s = time.monotonic() - started
        async with supervisor, follower:
            fleet = await run_fleet(
                live, config, on_progress=_progress_printer(console), stop_event=stop_event
            )
            report.fleet = fleet.summary
    report.wall_s = time.monotonic() - started
    return report


def _job_settings(settings: Settings, server_port: int) -> Settings:
    """This run's own topic prefix, model server port and (unless set) auth secret."""
    return settings.model_copy(
        update={
            "topic_prefix": f"demo-{time.strftime('%Y%m%d-%H%M%S')}",
            "server_port": server_port,
            "server_url": f"http://127.0.0.1:{server_port}",
            "auth_secret": settings.auth_secret or secrets.token_hex(16),
        }
    )


async def _register_base_heads(
    live: Settings, config: FleetConfig, model_ids: list[str], console: Console
) -> None:
    """The feature bank (built or loaded) and every model's base head ``v0`` on the model
    topic, before the cloud starts. The bank is let go on return: the fleet loads its own
    view of it."""
    from device_sim.fleet_setup import ensure_models, load_bank

    console.print(f"feature bank of the default world ({config.cut}) …", highlight=False)
    bank = await asyncio.to_thread(load_bank, live, config, progress=True)
    console.print(
        f"bank {bank.path.name}: {len(bank):,} features, "
        f"{'from cache' if bank.from_cache else f'built in {bank.build_seconds:.0f} s'}; "
        f"registering base heads v0 of {', '.join(model_ids)}",
        highlight=False,
    )
    await ensure_models(live, bank, model_ids)


def _cloud(live: Settings, console: Console) -> Supervisor:
    """The worker, a trainer and the model server as supervised children."""
    from pipeline.kafka_local import free_port
    from pipeline.supervisor import Supervisor, child_env, cloud_children

    assert live.kafka_bootstrap is not None
    return Supervisor(
        cloud_children(trainers=["auto"]),
        log_dir=live.log_dir,
        env=child_env(live, live.kafka_bootstrap)
        | {
            "FEDEX_SERVER_PORT": str(live.server_port),
            "FEDEX_SERVER_URL": live.server_url,
            # Its own worker web port: the job runs beside any stack on this machine.
            "FEDEX_WORKER_PORT": str(free_port()),
            "FEDEX_AUTH_SECRET": live.auth_secret or "",
        },
        on_event=lambda m: console.print(f"[dim]{m}[/dim]", highlight=False),
    )


def _job_announcer(
    report: MainJobReport, console: Console, started: float
) -> Callable[[ModelUpdate], None]:
    """The model topic's listener: each trained version into ``report.jobs``, and a line."""

    def on_update(update: ModelUpdate) -> None:
        if update.trigger_id is None:
            return  # a base version, registered before the cloud started
        job = TrainingJob.of(update, time.monotonic() - started)
        report.jobs.append(job)
        champion = job.champion_val_accuracy
        console.print(
            f"[green]{job.model_id} {job.version}[/green] trained on {job.train_samples:,} "
            f"samples in {job.train_seconds:.1f} s: validation {job.val_accuracy:.1%} "
            f"(champion {champion if champion is None else f'{champion:.1%}'})"
            f"{' → new best' if job.is_best else ', kept the champion'}",
            highlight=False,
        )

    return on_update


def _progress_printer(console: Console) -> Callable[[FleetProgress], None]:
    """The fleet's progress, one line every 10 wall seconds at most."""
    last = [0.0]

    def progress(p: FleetProgress) -> None:
        if p.wall_s - last[0] < 10.0:
            return
        last[0] = p.wall_s
        day, rest = divmod(p.sim_s, 86400.0)
        console.print(
            f"[{p.wall_s:4.0f} s | day {int(day)} {rest / 3600:4.1f} h] "
            f"{p.online:,}/{p.devices:,} online, {p.pushes_per_s:,.0f} pushes/s, "
            f"{p.samples_per_s:,.0f} samples/s, {p.samples:,} samples pushed, "
            f"{p.versions} versions seen, mean accuracy {p.mean_accuracy:.1%}",
            highlight=False,
        )

    return progress


# --------------------------------------------------------------------------- the report


def _pct(x: float | None) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:.1%}"


def print_report(report: MainJobReport, console: Console) -> None:
    fleet = report.fleet
    versions = {(v["model_id"], v["version"]): v for v in fleet.get("versions", [])}
    console.print(_versions_table(report, versions))
    if not fleet:
        console.print("[red]the fleet did not report[/red]")
        return
    _print_accuracy_gains(report, versions, console)
    summary = Table(title="the run")
    summary.add_column("metric")
    summary.add_column("value", justify="right")
    for name, value in _run_rows(report):
        summary.add_row(name, value)
    console.print(summary)
    if report.path is not None:
        console.print(f"report: {report.path}", highlight=False)


def _versions_table(report: MainJobReport, versions: Mapping[tuple[str, str], Any]) -> Table:
    """Per model its base head and every version trained, with what the devices saw."""
    table = Table(title="versions shipped")
    for col in (
        "model",
        "version",
        "validation acc.",
        "champion acc.",
        "best",
        "train samples",
        "train s",
        "devices applied",
        "device acc. before",
        "device acc. after",
    ):
        table.add_column(col, justify="left" if col in ("model", "version") else "right")
    for model_id in report.models:
        base = versions.get((model_id, "v0"))
        if base is not None:
            table.add_row(
                model_id, "v0 (base)", "", "", "yes", "", "", "", "", _pct(base["mean_accuracy"])
            )
        for job in sorted((j for j in report.jobs if j.model_id == model_id), key=lambda j: j.at_s):
            seen = versions.get((model_id, job.version))
            table.add_row(
                model_id,
                job.version,
                _pct(job.val_accuracy),
                _pct(job.champion_val_accuracy),
                "yes" if job.is_best else "no",
                f"{job.train_samples:,}",
                f"{job.train_seconds:.1f}",
                f"{seen['applied']:,}" if seen else "after the fleet stopped",
                _pct(seen["accuracy_before"]) if seen else "",
                _pct(seen["accuracy_after"]) if seen else "",
            )
    return table


def _print_accuracy_gains(
    report: MainJobReport, versions: Mapping[tuple[str, str], Any], console: Console
) -> None:
    """Per model: the devices' mean accuracy with ``v0`` and at the end."""
    per_model = report.fleet["per_model"]
    for model_id in report.models:
        base = versions.get((model_id, "v0"))
        final = per_model.get(model_id, {}).get("accuracy", math.nan)
        start = base["mean_accuracy"] if base else math.nan
        gain = final - start
        console.print(
            f"[bold]{model_id}[/bold]: devices' mean held-out accuracy {_pct(start)} (v0) → "
            f"{_pct(final)} at the end ({gain:+.1%})",
            highlight=False,
        )
    per_vendor = report.fleet.get("per_vendor", {})
    spread = report.fleet.get("vendor_spread", {})
    if per_vendor:
        table = Table(title="per vendor (camera pipeline): devices' mean held-out accuracy")
        for col in ("vendor", "devices", "first version", "at the end"):
            table.add_column(col, justify="left" if col == "vendor" else "right")
        for name, row in per_vendor.items():
            first = row.get("first_accuracy", math.nan)
            table.add_row(name, f"{row['devices']:,}", _pct(first), _pct(row["accuracy"]))
        for label, key in (("spread (best - worst)", "spread"), ("worst vendor", "worst_accuracy")):
            table.add_row(
                label,
                "",
                _pct(spread.get("first", {}).get(key, math.nan)),
                _pct(spread.get("final", {}).get(key, math.nan)),
            )
        console.print(table)


def _run_rows(report: MainJobReport) -> list[tuple[str, str]]:
    """The run's summary: size, times, samples, freshness, bytes, energy, jobs, retries."""
    fleet = report.fleet
    totals, per_device, fresh = fleet["totals"], fleet["per_device"], fleet["freshness"]
    jobs = report.jobs
    train_s = [j.train_seconds for j in jobs]
    return [
        ("devices, models", f"{report.devices:,}, {len(report.models)}"),
        (
            "wall time (preparation, fleet)",
            f"{report.wall_s:.0f} s ({report.prepare_s:.0f} s, {fleet['wall_s']:.0f} s)",
        ),
        ("simulated time", f"{fleet['sim_s'] / 3600:.1f} h"),
        ("samples ingested (acked pushes)", f"{totals['samples_pushed']:,} ({totals['pushes']:,})"),
        (
            "freshness p50 / p99 (simulated: label → model with it active on the device)",
            f"{fresh['sim_s']['p50'] / 3600:.1f} h / {fresh['sim_s']['p99'] / 3600:.1f} h "
            f"(n = {fresh['sim_s']['n']:,} pushes, still pending {fresh['pending']:,})",
        ),
        (
            "bytes per device up / down (mean)",
            f"{per_device['bytes_up']['mean'] / 1e3:,.1f} kB / "
            f"{per_device['bytes_down']['mean'] / 1e3:,.1f} kB",
        ),
        (
            "energy per device (mean / p99)",
            f"{per_device['energy_mah']['mean']:.2f} / {per_device['energy_mah']['p99']:.2f} mAh",
        ),
        (
            "training jobs (duration mean / max)",
            f"{len(jobs)} ({sum(train_s) / len(jobs):.1f} s / {max(train_s):.1f} s)"
            if jobs
            else "0",
        ),
        ("retries, evictions", f"{totals['retries']:,}, {totals['evicted']:,}"),
    ]


def run_demo(
    settings: Settings,
    *,
    devices: int = DEVICES,
    models: int = MODELS,
    duration_s: float = DURATION_S,
    out: Path = Path("bench/results/demo.json"),
) -> MainJobReport:
    """``fedex demo``: run the main job with Ctrl-C handling, print the report and save it
    as JSON to ``out`` (where ``fedex bench report`` finds the main job's freshness)."""
    from pipeline.lifecycle import stop_on_signals

    console = Console()
    if not console.is_terminal:
        console = Console(width=150)  # a log file: keep the tables whole

    async def main() -> MainJobReport:
        stop = asyncio.Event()
        with stop_on_signals(stop.set):
            return await run_main_job(
                settings,
                devices=devices,
                models=models,
                duration_s=duration_s,
                console=console,
                stop_event=stop,
            )

    report = asyncio.run(main())
    report.path = write_json(orjson.loads(orjson.dumps(report.as_dict())), out)
    print_report(report, console)
    return report
