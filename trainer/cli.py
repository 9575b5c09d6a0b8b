"""``fedex trainer``: the trainer's command."""

from __future__ import annotations

import typer

from pipeline.settings import Settings


def trainer(
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N"),
    max_jobs: int | None = typer.Option(None, help="stop after N triggers"),
    idle_timeout: float | None = typer.Option(None, help="stop after S seconds without a trigger"),
) -> None:
    """One trainer process (group <prefix>-trainers): triggers in, model versions out."""
    from trainer.process import run_trainer

    run_trainer(Settings(), device=device, max_jobs=max_jobs, idle_timeout=idle_timeout)


def register(app: typer.Typer) -> None:
    """Adds this package's commands to the ``fedex`` CLI (entry point ``fedex.commands``)."""
    app.command("trainer")(trainer)
