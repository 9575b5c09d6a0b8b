"""``fedex bench ...`` and ``fedex demo``: the benchmarks and the main job.

Each command imports its bench module inside it: ``fedex`` itself must start fast."""

from __future__ import annotations

import asyncio
from pathlib import Path

import typer

from pipeline.settings import Settings

OUT_HELP = "JSON result path (default bench/results/<name>.json)"
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: print a table and write JSON.")
KEEP_HELP = "keep the topics the bench creates (default: deleted at the end)"


@bench_app.callback()
def _begin() -> None:
    """Benchmarks: each prints a table and writes JSON with the conditions it ran under."""
    from lab import measure

    measure.begin()


@bench_app.command("codec")
def bench_codec(
    samples: int = typer.Option(10, help="samples per push"),
    repeats: int = typer.Option(5, help="timed runs per row (best and median reported)"),
    out: Path | None = typer.Option(None, help=OUT_HELP),
) -> None:
    """Encode/decode rate of 10-sample pushes on one core."""
    from lab.transport_bench import run_codec_bench

    run_codec_bench(samples=samples, repeats=repeats, out=out)


@bench_app.command("kafka")
def bench_kafka(
    messages: int = typer.Option(20_000, help="pushes per run"),
    repeats: int = typer.Option(5, help="timed runs after one warm-up run"),
    keep: bool = typer.Option(False, "--keep", help=KEEP_HELP),
    out: Path | None = typer.Option(None, help=OUT_HELP),
) -> None:
    """Raw aiokafka produce→consume rate of freeze6 pushes: the pipeline's ceiling."""
    from lab.bench_broker import bench_kafka
    from lab.transport_bench import run_kafka_bench

    async def run() -> None:
        async with bench_kafka(Settings(), keep=keep) as bootstrap:
            await asyncio.to_thread(
                run_kafka_bench, bootstrap=bootstrap, messages=messages, repeats=repeats, out=out
            )

    asyncio.run(run())


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
    from lab.train_bench import main as bench_main

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
    messages: int = typer.Option(20_000, help="pushes per run, each side of a pair"),
    repeat: int = typer.Option(5, help="measured raw/agents pairs, interleaved (ABAB…)"),
    update_jobs: int = typer.Option(100, help="training jobs timed for update latency"),
    device: str = typer.Option("auto", help="trainer device for update latency"),
    keep: bool = typer.Option(False, "--keep", help=KEEP_HELP),
    out: Path | None = typer.Option(None, help=OUT_HELP),
) -> None:
    """Samples/s through the aggregation agents vs raw Kafka (same records, interleaved
    pairs), trigger latency (threshold crossed → trigger on the topic) and update latency
    (trigger → model update)."""
    from lab.pipeline_bench import PipelineBenchConfig, run_pipeline_bench

    run_pipeline_bench(
        Settings(),
        PipelineBenchConfig(messages=messages, pairs=repeat),
        update_jobs=update_jobs,
        device=device,
        keep=keep,
        out=out,
    )


def demo(
    devices: int = typer.Option(1000, help="simulated devices"),
    models: int = typer.Option(2, help="models (faces-1..faces-M)"),
    duration: str = typer.Option("3m", help="how long the fleet runs (90s, 3m, …)"),
    out: Path = typer.Option(Path("bench/results/demo.json"), help="JSON report path"),
) -> None:
    """The main job: local Kafka, worker, trainer, model server and a device fleet, then
    the report (see the README)."""
    from device_sim.fleet_setup import parse_duration
    from lab.main_job import run_demo

    run_demo(
        Settings(),
        devices=devices,
        models=models,
        duration_s=parse_duration(duration),
        out=out,
    )


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
    from lab.chaos_bench import run_chaos_bench

    kafka_libs = Settings().home / "kafka" / "libs"
    run_chaos_bench(
        scenarios=scenario, runs=runs, audit_samples=audit_samples, out=out, libs_dir=kafka_libs
    )


@bench_app.command("push")
def bench_push(
    repeats: int = typer.Option(10, help="timed pushes per level and path"),
    pull_repeats: int = typer.Option(5, help="timed pulls per checkpoint"),
    keep: bool = typer.Option(False, "--keep", help=KEEP_HELP),
    out: Path | None = typer.Option(None, help=OUT_HELP),
) -> None:
    """Table 2: push (Kafka acks=all, HTTP) and pull latency per freeze level on loopback,
    plus modelled latency on the simulated mobile network tiers, and the FedAvg push."""
    from lab.bench_broker import bench_kafka
    from lab.push_bench import PushBenchConfig, run_push_bench

    config = PushBenchConfig(repeats=repeats, pull_repeats=pull_repeats)

    async def run() -> None:
        async with bench_kafka(Settings(), keep=keep) as bootstrap:
            await asyncio.to_thread(run_push_bench, bootstrap=bootstrap, config=config, out=out)

    asyncio.run(run())


@bench_app.command("datafraction")
def bench_datafraction(
    config: str = typer.Option("default", help="world and bank: default (the demo's) or small"),
    scale: str | None = typer.Option(
        None,
        help="expanded world sampled from the bank's feature model: 'paper' (8,631 identities, "
        "437,855 features) or a fraction of it such as 0.1; default the real bank itself",
    ),
    seeds: int = typer.Option(5, help="seeds per point (mean ± std)"),
    epochs: int = typer.Option(10, help="epochs of every head (base and retrained)"),
    arm: list[str] | None = typer.Option(None, help="only this arm (repeatable)"),
    out: Path | None = typer.Option(None, help=OUT_HELP),
    plot: Path | None = typer.Option(Path("docs/img/datafraction.png"), help="PNG of the curve"),
) -> None:
    """Figure 4: validation accuracy vs fraction of additional user data (0-100%)."""
    from lab.bench_banks import parse_scale
    from lab.datafraction_bench import ARMS, run_datafraction_bench

    try:
        settings = Settings()
        run_datafraction_bench(
            bank_dir=settings.bank_dir,
            home=settings.home,
            config=config,
            scale=parse_scale(scale),
            seeds=seeds,
            epochs=epochs,
            arms=tuple(arm) if arm else ARMS,
            out=out,
            plot=plot,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


@bench_app.command("expansion")
def bench_expansion(
    config: str = typer.Option("default", help="real bank the feature model is fitted on"),
    seeds: int = typer.Option(3, help="seeds per model"),
    epochs: int = typer.Option(10, help="epochs of every head"),
    out: Path | None = typer.Option(None, help=OUT_HELP),
) -> None:
    """Fidelity of the feature-space expansion: heads on sampled vs real features."""
    from lab.expansion_bench import run_expansion_bench

    settings = Settings()
    try:
        run_expansion_bench(
            bank_dir=settings.bank_dir,
            home=settings.home,
            config=config,
            seeds=seeds,
            epochs=epochs,
            out=out,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


@bench_app.command("paper-job")
def bench_paper_job(
    scale: str = typer.Option("paper", help="'paper' (437,855 features) or a fraction such as 0.1"),
    epochs: int = typer.Option(10, help="epochs of the job (the paper: 10)"),
    device: str = typer.Option("auto", help="trainer device: auto, cpu, cuda"),
    config: str = typer.Option("default", help="real bank the world is fitted on"),
    keep: bool = typer.Option(False, "--keep", help=KEEP_HELP),
    out: Path | None = typer.Option(None, help=OUT_HELP),
) -> None:
    """One job of the paper's size through the real pipeline: log → trigger → trainer → update."""
    from lab.bench_banks import parse_scale
    from lab.paper_job import run_paper_job_bench

    try:
        parsed = parse_scale(scale)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    run_paper_job_bench(
        Settings(),
        scale=parsed or 1.0,
        epochs=epochs,
        device=device,
        config=config,
        keep=keep,
        out=out,
    )


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
    readme: Path = typer.Option(Path("README.md"), help="README whose benchmark table to render"),
) -> None:
    """Run every benchmark (each its own process), then write docs/benchmarks.md and its
    plots. A bench that fails or has no result is shown as missing with the reason."""
    from lab.bench_report import run_report

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
            readme=readme if readme.is_file() else None,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    typer.echo(f"wrote {path} and {', '.join(str(i) for i in images) or 'no plots'}")


@bench_app.command("fedavg")
def bench_fedavg(
    devices: int = typer.Option(150, help="devices of one model of the default world"),
    samples: int = typer.Option(32, help="samples per device (pushed once / trained on)"),
    fraction: float = typer.Option(0.1, help="FedAvg: share of devices selected per round"),
    local_epochs: int = typer.Option(5, help="FedAvg: local epochs E (0 = FedSGD gradients)"),
    batch_size: int = typer.Option(10, help="FedAvg: local minibatch size B"),
    lr: float = typer.Option(0.1, help="FedAvg: local SGD learning rate"),
    max_rounds: int = typer.Option(800, help="FedAvg: give up after this many rounds"),
    fedex_epochs: int = typer.Option(30, help="FedEx: trainer epochs for the one job"),
    seed: int = typer.Option(0, help="first seed of devices, data draws and selection"),
    seeds: int = typer.Option(5, help="seeds; median and min-max over them"),
    keep: bool = typer.Option(False, "--keep", help=KEEP_HELP),
    out: Path | None = typer.Option(None, help=OUT_HELP),
) -> None:
    """FedEx vs FedAvg on one broker and the same task: accuracy, rounds, bytes and compute
    per device, wall time (docs/fedavg.md)."""
    from lab.fedavg_arm import BenchConfig
    from lab.fedavg_bench import run_bench

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
        seeds=seeds,
    )
    run_bench(Settings(), config, out, keep=keep)


@bench_app.command("fleet")
def bench_fleet(
    devices: int = typer.Option(10_000, help="devices in the one-process run"),
    seconds: float = typer.Option(30.0, help="measured window of the one-process run"),
    fanout_devices: int = typer.Option(10_000, help="devices of the fan-out measurement"),
    fanout_versions: int = typer.Option(20, help="versions published for fan-out"),
    big: int = typer.Option(100_000, help="devices of the multi-process run (0: skip)"),
    processes: int = typer.Option(10, help="processes of the multi-process run"),
    big_seconds: float = typer.Option(45.0, help="measured window of the multi-process run"),
    keep: bool = typer.Option(False, "--keep", help=KEEP_HELP),
    out: Path | None = typer.Option(None, help=OUT_HELP),
) -> None:
    """10,000 devices in one process (RSS, loop lag, pushes/s), model fan-out to 10,000
    devices, and 100,000 devices across processes."""
    from lab.fleet_bench import FleetBenchConfig, run_fleet_bench

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
        keep=keep,
    )


def register(app: typer.Typer) -> None:
    """Adds this package's commands to the ``fedex`` CLI (entry point ``fedex.commands``)."""
    app.command("demo")(demo)
    app.add_typer(bench_app, name="bench")
