"""The ``fedex`` command: one entry point for every actor, benchmark and tool.

Commands import their heavy modules (torch, faust) lazily so that ``fedex kafka`` and
``fedex topics`` start fast. Each command builds the process's one ``Settings``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import typer

from pipeline.cli_kafka import kafka_app, topics_app
from pipeline.settings import Settings

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="FedEx Stream: feature-based user-adaptive training on Kafka.",
)
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: print a table and write JSON.")
app.add_typer(kafka_app, name="kafka")
app.add_typer(topics_app, name="topics")
app.add_typer(bench_app, name="bench")
models_app = typer.Typer(no_args_is_help=True, help="Models on the model topic.")
app.add_typer(models_app, name="models")
bank_app = typer.Typer(no_args_is_help=True, help="Feature banks of the world, built once.")
app.add_typer(bank_app, name="bank")
token_app = typer.Typer(no_args_is_help=True, help="Device bearer tokens for the model server.")
app.add_typer(token_app, name="token")

OUT_HELP = "JSON result path (default bench/results/<name>.json)"


@app.callback()
def _setup(verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logging")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    # aiokafka logs every rebalance at INFO; keep the console for our own progress.
    logging.getLogger("aiokafka").setLevel(logging.DEBUG if verbose else logging.WARNING)


@bench_app.command("codec")
def bench_codec(
    samples: int = typer.Option(10, help="samples per push"),
    repeats: int = typer.Option(5, help="timed runs per row (best and median reported)"),
    out: Path | None = typer.Option(None, help=OUT_HELP),
) -> None:
    """Encode/decode rate of 10-sample pushes on one core."""
    from pipeline.transport_bench import run_codec_bench

    run_codec_bench(samples=samples, repeats=repeats, out=out)


@bench_app.command("kafka")
def bench_kafka(
    messages: int = typer.Option(20_000, help="pushes per run"),
    repeats: int = typer.Option(3, help="timed runs"),
    out: Path | None = typer.Option(None, help=OUT_HELP),
) -> None:
    """Raw aiokafka produce→consume rate of freeze6 pushes: the pipeline's ceiling."""
    from pipeline.stack import kafka_for
    from pipeline.transport_bench import run_kafka_bench

    async def run() -> None:
        async with kafka_for(Settings()) as bootstrap:
            await asyncio.to_thread(
                run_kafka_bench, bootstrap=bootstrap, messages=messages, repeats=repeats, out=out
            )

    asyncio.run(run())


@app.command("worker")
def worker(
    max_runtime: float | None = typer.Option(None, help="stop after this many seconds"),
) -> None:
    """Run one aggregation-agents worker (Faust) until Ctrl-C / SIGTERM."""
    from agents.worker import run_worker

    run_worker(Settings(), max_runtime=max_runtime)


@bench_app.command("train")
def bench_train(
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N"),
    levels: str | None = typer.Option(
        None, help="comma list such as freeze5,freeze6 (default freeze1..freeze6; 'all' adds full)"
    ),
    num_classes: int = typer.Option(8631, help="classifier width (VGGFace2: 8,631)"),
    seconds: float | None = typer.Option(None, help="timed seconds per level"),
    out: Path | None = typer.Option(None, help=OUT_HELP),
) -> None:
    """Training samples/s per freeze level beside the paper's Table 1 and the matmul ceiling."""
    from trainer.bench import main as bench_main

    argv = ["--device", device, "--num-classes", str(num_classes)]
    if levels is not None:
        argv += ["--levels", levels]
    if seconds is not None:
        argv += ["--seconds", str(seconds)]
    if out is not None:
        argv += ["--out", str(out)]
    bench_main(argv)


@bench_app.command("pipeline")
def bench_pipeline(
    messages: int = typer.Option(20_000, help="pushes through the agents"),
    update_jobs: int = typer.Option(5, help="training jobs timed for update latency"),
    device: str = typer.Option("auto", help="trainer device for update latency"),
    out: Path | None = typer.Option(None, help=OUT_HELP),
) -> None:
    """Samples/s through the aggregation agents vs raw Kafka (same run), trigger latency
    (threshold crossed → trigger on the topic) and update latency (trigger → model update)."""
    import uuid

    from agents.bench import measure_agent_throughput
    from pipeline.benchio import write_result
    from pipeline.stack import kafka_for
    from trainer.latency import measure_update_latency

    async def run() -> dict[str, object]:
        settings = Settings()
        async with kafka_for(settings) as bootstrap:
            prefix = f"bench-pipeline-{uuid.uuid4().hex[:8]}"
            agents = await asyncio.to_thread(measure_agent_throughput, bootstrap, prefix, messages)
            live = settings.model_copy(update={"kafka_bootstrap": bootstrap})
            update = await measure_update_latency(live, jobs=update_jobs, device=device)
            return {"agents": agents, "update": update}

    result = asyncio.run(run())
    typer.echo(json.dumps(result, indent=2, default=str))
    print(f"wrote {write_result('pipeline', result, out)}")


@app.command("trainer")
def trainer(
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N"),
    max_jobs: int | None = typer.Option(None, help="stop after N triggers"),
    idle_timeout: float | None = typer.Option(None, help="stop after S seconds without a trigger"),
) -> None:
    """One trainer process (group <prefix>-trainers): triggers in, model versions out."""
    from trainer.worker import run_trainer

    run_trainer(Settings(), device=device, max_jobs=max_jobs, idle_timeout=idle_timeout)


@app.command("audit")
def audit(as_json: bool = typer.Option(False, "--json", help="print the report as JSON")) -> None:
    """Check from the topics alone that every acked sample is trained exactly once (or
    pending, in flight, or dead-lettered); exit 1 on any violation."""
    from pipeline.audit_log import audit_deployment, print_report

    report, seconds = asyncio.run(audit_deployment(Settings()))
    if as_json:
        typer.echo(json.dumps({**report.to_json(), "seconds": round(seconds, 3)}, indent=2))
    else:
        print_report(report, seconds)
    raise typer.Exit(0 if report.clean else 1)


@models_app.command("register")
def models_register(
    model_id: str,
    num_classes: int = typer.Option(..., "--num-classes", help="classifier width"),
    backbone: str = typer.Option("inception_resnet_v1", help="inception_resnet_v1 or mobilenet_v2"),
    cut: str = typer.Option("freeze6", help="freeze level the devices push at"),
    seed: int = typer.Option(0, help="seed of the zoo's random head"),
    exist_ok: bool = typer.Option(False, "--exist-ok", help="no error if the model exists"),
) -> None:
    """Publish a model's base version v0 (a random-init head of the zoo)."""
    from pipeline.publishing import register_model

    update = asyncio.run(
        register_model(
            Settings(), model_id, backbone, cut, num_classes, seed=seed, exist_ok=exist_ok
        )
    )
    where = "inline" if update.checkpoint else "by reference"
    typer.echo(
        f"{update.model_id} {update.version} sha256 {update.sha256} ({update.size:,} B, {where})"
    )


@app.command("serve")
def serve(
    host: str | None = typer.Option(None, help="bind address (default FEDEX_SERVER_HOST)"),
    port: int | None = typer.Option(None, help="port (default FEDEX_SERVER_PORT; 0 = any free)"),
    max_runtime: float | None = typer.Option(None, help="stop after this many seconds"),
) -> None:
    """The model server: registry, checkpoint downloads and HTTP pushes."""
    from pipeline.server import run_server

    run_server(Settings(), host=host, port=port, max_runtime=max_runtime)


@token_app.command("issue")
def token_issue(
    device: str = typer.Option(..., help="device id the token is issued to"),
    model: list[str] = typer.Option(
        ..., help="model id it may push to and pull from; repeat it, or '*' for every model"
    ),
    ttl: int | None = typer.Option(None, help="lifetime in seconds (default FEDEX_TOKEN_TTL_S)"),
) -> None:
    """Print a bearer token signed with FEDEX_AUTH_SECRET (the model server's secret)."""
    import time

    from pipeline.auth import ANY_MODEL, issue_token

    settings = Settings()
    if not settings.auth_secret:
        raise typer.BadParameter("set FEDEX_AUTH_SECRET to the model server's secret")
    models: list[str] | str = ANY_MODEL if ANY_MODEL in model else model
    try:
        token = issue_token(
            settings.auth_secret, device, models, ttl or settings.token_ttl_s, time.time()
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    typer.echo(token)


@bank_app.command("build")
def bank_build(
    cut: str = typer.Option("freeze6", "--cut", help="freeze level: freeze1..freeze6"),
    backbone: str = typer.Option(
        "inception_resnet_v1", "--backbone", help="inception_resnet_v1 or mobilenet_v2"
    ),
    images: Path | None = typer.Option(
        None, "--images", help="real faces: DIR/<identity>/*.jpg|png"
    ),
    weights: Path | None = typer.Option(None, "--weights", help="local backbone state-dict file"),
    seed: int = typer.Option(0, "--seed", help="seed of the synthetic world"),
    batch_size: int = typer.Option(32, help="images per prefix forward"),
    base_report: bool = typer.Option(
        True, "--base-report/--no-base-report", help="train and report each model's base head"
    ),
) -> None:
    """Build (or find in $FEDEX_HOME/banks) the feature bank of the synthetic world."""
    from device_sim.bank import run_bank_build

    run_bank_build(
        out=Settings().bank_dir,
        cut=cut,
        backbone=backbone,
        images=images,
        weights=weights,
        seed=seed,
        batch_size=batch_size,
        base_report=base_report,
    )


@app.command("up")
def up(
    trainer: list[str] = typer.Option(
        ["auto"], "--trainer", help="one trainer per value: auto, cpu, cuda, cuda:N (repeatable)"
    ),
    max_runtime: float | None = typer.Option(None, help="stop after this many seconds"),
) -> None:
    """Broker (unless FEDEX_KAFKA_BOOTSTRAP), topics, worker, trainer(s) and model server,
    supervised; logs under $FEDEX_HOME/logs; Ctrl-C stops everything."""
    from rich.console import Console

    from pipeline.supervisor import run_up

    console = Console()
    asyncio.run(
        run_up(
            Settings(),
            trainers=trainer,
            max_runtime=max_runtime,
            on_event=lambda message: console.print(f"[bold]up[/bold] {message}", highlight=False),
        )
    )


@app.command("demo")
def demo(
    devices: int = typer.Option(1000, help="simulated devices"),
    models: int = typer.Option(2, help="models (faces-1..faces-M)"),
    duration: str = typer.Option("3m", help="how long the fleet runs (90s, 3m, …)"),
    out: Path = typer.Option(Path("bench/results/demo.json"), help="JSON report path"),
) -> None:
    """The main job: local Kafka, worker, trainer, model server and a device fleet, then
    the report (see the README)."""
    from device_sim.demo import run_demo
    from device_sim.fleet_setup import parse_duration

    run_demo(
        Settings(),
        devices=devices,
        models=models,
        duration_s=parse_duration(duration),
        out=out,
    )


# --- bench push | datafraction | report (issue 5: the paper's tables and docs/benchmarks.md)


@bench_app.command("chaos")
def bench_chaos(
    scenario: list[str] = typer.Option(
        ["age", "kill", "full"], "--scenario", help="age, kill or full (repeatable)"
    ),
    runs: int = typer.Option(3, help="runs of each scenario"),
    audit_samples: int = typer.Option(
        1_000_000, help="samples of the audit-speed deployment (0 = skip)"
    ),
    out: Path | None = typer.Option(None, help=OUT_HELP),
) -> None:
    """Faults on the real stack (broker kill/pause, worker/trainer kills), then the audit."""
    from pipeline.chaos_bench import run_chaos_bench

    kafka_libs = Settings().home / "kafka" / "libs"
    run_chaos_bench(
        scenarios=scenario, runs=runs, audit_samples=audit_samples, out=out, libs_dir=kafka_libs
    )


@bench_app.command("push")
def bench_push(
    repeats: int = typer.Option(10, help="timed pushes per level and path"),
    pull_repeats: int = typer.Option(5, help="timed pulls per checkpoint"),
    out: Path | None = typer.Option(None, help=OUT_HELP),
) -> None:
    """Table 2: push (Kafka acks=all, HTTP) and pull latency per freeze level on loopback,
    plus modelled latency on the simulated mobile network tiers, and the FedAvg push."""
    from device_sim.push_bench import run_push_bench
    from pipeline.stack import kafka_for

    async def run() -> None:
        async with kafka_for(Settings()) as bootstrap:
            await asyncio.to_thread(
                run_push_bench,
                bootstrap=bootstrap,
                repeats=repeats,
                pull_repeats=pull_repeats,
                out=out,
            )

    asyncio.run(run())


@bench_app.command("datafraction")
def bench_datafraction(
    config: str = typer.Option("default", help="world and bank: default (the demo's) or small"),
    seeds: int = typer.Option(5, help="seeds per point (mean ± std)"),
    epochs: int = typer.Option(30, help="epochs of every head (base and retrained)"),
    out: Path | None = typer.Option(None, help=OUT_HELP),
    plot: Path | None = typer.Option(Path("docs/img/datafraction.png"), help="PNG of the curve"),
) -> None:
    """Figure 4: validation accuracy vs fraction of additional user data (0-100%)."""
    from device_sim.datafraction_bench import run_datafraction_bench

    try:
        run_datafraction_bench(
            bank_dir=Settings().bank_dir,
            config=config,
            seeds=seeds,
            epochs=epochs,
            out=out,
            plot=plot,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


@bench_app.command("report")
def bench_report(
    only: list[str] | None = typer.Option(None, help="run only this bench (repeatable)"),
    skip: list[str] | None = typer.Option(None, help="do not run this bench (repeatable)"),
    render_only: bool = typer.Option(
        False, "--render-only", help="run nothing: re-render docs from bench/results/*.json"
    ),
    timeout: float = typer.Option(1800.0, help="seconds one bench may run"),
    results: Path = typer.Option(Path("bench/results"), help="result JSON directory"),
    docs: Path = typer.Option(Path("docs"), help="where benchmarks.md and img/ go"),
) -> None:
    """Run every benchmark (each its own process), then write docs/benchmarks.md and its
    plots. A bench that fails or has no result is shown as missing with the reason."""
    from pipeline.bench_report import run_report

    try:
        path, images, _ = run_report(
            results_dir=results,
            docs_dir=docs,
            log_dir=Settings().log_dir / "bench-report",
            only=only,
            skip=skip or (),
            render_only=render_only,
            timeout=timeout,
            echo=typer.echo,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    typer.echo(f"wrote {path} and {', '.join(str(i) for i in images) or 'no plots'}")


# --- end bench push | datafraction | report


# ------------------------------------------------------------- FedAvg baseline (issue 5)


@bench_app.command("fedavg")
def bench_fedavg(
    devices: int = typer.Option(150, help="devices of one model of the default world"),
    samples: int = typer.Option(32, help="samples per device (pushed once / trained on)"),
    fraction: float = typer.Option(0.1, help="FedAvg: share of devices selected per round"),
    local_epochs: int = typer.Option(5, help="FedAvg: local epochs E (0 = FedSGD gradients)"),
    batch_size: int = typer.Option(10, help="FedAvg: local minibatch size B"),
    lr: float = typer.Option(0.1, help="FedAvg: local SGD learning rate"),
    max_rounds: int = typer.Option(300, help="FedAvg: give up after this many rounds"),
    fedex_epochs: int = typer.Option(30, help="FedEx: trainer epochs for the one job"),
    seed: int = typer.Option(0, help="seed of devices, data draws and selection"),
    out: Path | None = typer.Option(None, help=OUT_HELP),
) -> None:
    """FedEx vs FedAvg on one broker and the same task: accuracy, rounds, bytes and compute
    per device, wall time (docs/fedavg.md)."""
    from device_sim.fedavg_bench import BenchConfig, run_bench

    config = BenchConfig(
        devices=devices,
        samples=samples,
        fraction=fraction,
        local_epochs=local_epochs,
        batch_size=batch_size,
        lr=lr,
        max_rounds=max_rounds,
        fedex_epochs=fedex_epochs,
        seed=seed,
    )
    run_bench(Settings(), config, out)


# --- devices | bench fleet (issue 4: the device fleet)


@app.command("devices")
def devices(
    count: int = typer.Option(1000, "--count", help="devices in the fleet"),
    models: int = typer.Option(
        2, "--models", help="models (faces-1..faces-M), devices round-robin"
    ),
    cut: str = typer.Option("freeze6", "--cut", help="freeze level the devices push at"),
    backbone: str = typer.Option(
        "inception_resnet_v1", "--backbone", help="inception_resnet_v1 or mobilenet_v2"
    ),
    duration: str | None = typer.Option(None, "--duration", help="e.g. 90s, 5m, 1h"),
    max_pushes: int | None = typer.Option(None, "--max-pushes", help="stop after N acked pushes"),
    processes: int = typer.Option(1, "--processes", help="worker processes (count/P devices each)"),
    seed: int = typer.Option(0, "--seed", help="seed of the world and the devices"),
    features: str = typer.Option("bank", "--features", help="bank, or live (small fleets)"),
    time_scale: float | None = typer.Option(
        None, "--time-scale", help="simulated s per wall s (default FEDEX_FLEET_TIME_SCALE)"
    ),
    availability: str = typer.Option(
        "rhythm", "--availability", help="rhythm (daily charging windows) or always"
    ),
    transfer_time: bool = typer.Option(
        True, "--transfer-time/--no-transfer-time", help="simulate network transfer time"
    ),
    compression: str | None = typer.Option(None, "--compression", help="producer: gzip, lz4, …"),
    per_device: bool = typer.Option(False, "--per-device", help="per-device columns in the JSON"),
    out: Path | None = typer.Option(None, "--out", help="JSON report (default $FEDEX_HOME/fleet/)"),
) -> None:
    """Simulate a fleet of devices: inference, feedback, cached feature+label samples
    pushed in charging windows, model versions pulled and applied. Live progress, a
    summary table and a JSON report; Ctrl-C flushes and reports."""
    from device_sim.console import run_devices
    from device_sim.devices import Availability, DeviceParams
    from device_sim.fleet import FleetConfig, parse_duration
    from pipeline.errors import ConfigError
    from pipeline.records import Backbone, Cut

    settings = Settings()
    try:
        config = FleetConfig(
            count=count,
            models=models,
            cut=Cut(cut),
            backbone=Backbone(backbone),
            duration_s=parse_duration(duration) if duration else None,
            max_pushes=max_pushes,
            seed=seed,
            features=features,  # type: ignore[arg-type]  # validated by FleetConfig
            time_scale=time_scale or settings.fleet_time_scale,
            send_timeout_s=settings.fleet_send_timeout_s,
            params=DeviceParams(
                availability=Availability(availability), simulate_transfer=transfer_time
            ),
            compression=compression,
            per_device=per_device,
        )
    except (ConfigError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    if config.duration_s is None and config.max_pushes is None:
        typer.echo("no --duration or --max-pushes: running until Ctrl-C", err=True)
    run_devices(settings, config, processes=processes, out=out)


@bench_app.command("fleet")
def bench_fleet(
    devices: int = typer.Option(10_000, help="devices in the one-process run"),
    seconds: float = typer.Option(30.0, help="measured window of the one-process run"),
    fanout_devices: int = typer.Option(10_000, help="devices of the fan-out measurement"),
    fanout_versions: int = typer.Option(5, help="versions published for fan-out"),
    big: int = typer.Option(100_000, help="devices of the multi-process run (0: skip)"),
    processes: int = typer.Option(10, help="processes of the multi-process run"),
    big_seconds: float = typer.Option(45.0, help="measured window of the multi-process run"),
    out: Path | None = typer.Option(None, help=OUT_HELP),
) -> None:
    """10,000 devices in one process (RSS, loop lag, pushes/s), model fan-out to 10,000
    devices, and 100,000 devices across processes."""
    from device_sim.fleet_bench import FleetBenchConfig, run_fleet_bench

    run_fleet_bench(
        Settings(),
        FleetBenchConfig(
            devices=devices,
            seconds=seconds,
            fanout_devices=fanout_devices,
            fanout_versions=fanout_versions,
            big_devices=big,
            big_processes=processes,
            big_seconds=big_seconds,
        ),
        out,
    )


def main() -> None:
    app()
