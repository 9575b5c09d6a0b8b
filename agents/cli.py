"""``fedex worker``: the aggregation agents' command."""

from __future__ import annotations

import typer

from pipeline.settings import Settings


def worker(
    max_runtime: float | None = typer.Option(None, help="stop after this many seconds"),
) -> None:
    """Run one aggregation-agents worker (Faust) until Ctrl-C / SIGTERM."""
    from agents.worker import run_worker

    run_worker(Settings(), max_runtime=max_runtime)


def register(app: typer.Typer) -> None:
    """Adds this package's commands to the ``fedex`` CLI (entry point ``fedex.commands``)."""
    app.command("worker")(worker)
