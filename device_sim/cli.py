"""``fedex devices`` and ``fedex bank``: the device fleet's commands.

Heavy modules (torch, the world) are imported inside the commands: ``fedex`` itself must
start fast for the commands that do not need them."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.settings import Settings

bank_app = typer.Typer(no_args_is_help=True, help="Feature banks of the world, built once.")


@bank_app.command("build")
def bank_build(
    cut: str = typer.Option("freeze6", "--cut", help="freeze level: freeze1..freeze6"),
    backbone: str = typer.Option(
        "inception_resnet_v1", "--backbone", help="inception_resnet_v1 or mobilenet_v2"
    ),
    images: Path | None = typer.Option(
        None, "--images", help="real faces: DIR/<identity>/*.jpg|png"
    ),
    weights: str = typer.Option(
        "pretrained",
        "--weights",
        help="'pretrained' (FaceNet CASIA-WebFace, converted by `fedex weights convert`), "
        "'none' (random init, fast tests) or a local backbone state-dict file",
    ),
    seed: int = typer.Option(0, "--seed", help="seed of the synthetic world"),
    batch_size: int = typer.Option(32, help="images per prefix forward"),
    base_report: bool = typer.Option(
        True, "--base-report/--no-base-report", help="train and report each model's base head"
    ),
) -> None:
    """Build (or find in $FEDEX_HOME/banks) the feature bank of the synthetic world."""
    from device_sim.bank_build import run_bank_build
    from pipeline.facenet_weights import WeightsError, resolve_weights

    settings = Settings()
    try:
        weights_file = resolve_weights(settings.home, weights)
    except WeightsError as exc:
        raise typer.BadParameter(str(exc)) from exc
    run_bank_build(
        out=settings.bank_dir,
        cut=cut,
        backbone=backbone,
        images=images,
        weights=weights_file,
        seed=seed,
        batch_size=batch_size,
        base_report=base_report,
    )


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
    features: str = typer.Option(
        "fresh",
        "--features",
        help="fresh (a new draw of the fitted feature model per sample), bank (redraw bank "
        "rows) or live (render + backbone per sample, small fleets)",
    ),
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
    from device_sim.fleet_config import FleetConfig, FleetSchedule, SendPolicy
    from device_sim.fleet_setup import parse_duration
    from pipeline.errors import ConfigError
    from pipeline.records import Backbone, Cut

    settings = Settings()
    try:
        config = FleetConfig(
            count=count,
            models=models,
            cut=Cut(cut),
            backbone=Backbone(backbone),
            seed=seed,
            features=features,  # type: ignore[arg-type]  # validated by FleetConfig
            schedule=FleetSchedule(
                duration_s=parse_duration(duration) if duration else None,
                max_pushes=max_pushes,
                time_scale=time_scale or settings.fleet_time_scale,
            ),
            sending=SendPolicy(
                compression=compression, send_timeout_s=settings.fleet_send_timeout_s
            ),
            params=DeviceParams(
                availability=Availability(availability), simulate_transfer=transfer_time
            ),
            per_device=per_device,
        )
    except (ConfigError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    if config.schedule.duration_s is None and config.schedule.max_pushes is None:
        typer.echo("no --duration or --max-pushes: running until Ctrl-C", err=True)
    run_devices(settings, config, processes=processes, out=out)


def register(app: typer.Typer) -> None:
    """Adds this package's commands to the ``fedex`` CLI (entry point ``fedex.commands``)."""
    app.command("devices")(devices)
    app.add_typer(bank_app, name="bank")
