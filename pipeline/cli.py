"""The ``fedex`` command, assembled: the shared base and pipeline's own commands here, and
every package's commands from its ``register(app)`` (entry points in the group
``fedex.commands``: ``agents.cli``, ``trainer.cli``, ``device_sim.cli``, ``lab.cli``), so
that this package imports no app.

Commands import their heavy modules (torch, faust) inside them so that ``fedex kafka`` and
``fedex topics`` start fast. Each command builds the process's one ``Settings``.
"""

from __future__ import annotations

import asyncio
import json
import logging

import typer

from pipeline.cli_kafka import kafka_app, topics_app
from pipeline.cli_weights import weights_app
from pipeline.settings import Settings

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="FedEx Stream: feature-based user-adaptive training on Kafka.",
)
app.add_typer(kafka_app, name="kafka")
app.add_typer(topics_app, name="topics")
app.add_typer(weights_app, name="weights")
models_app = typer.Typer(no_args_is_help=True, help="Models on the model topic.")
app.add_typer(models_app, name="models")
token_app = typer.Typer(no_args_is_help=True, help="Device bearer tokens for the model server.")
app.add_typer(token_app, name="token")


@app.callback()
def _setup(verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logging")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    # aiokafka logs every rebalance at INFO; keep the console for our own progress.
    logging.getLogger("aiokafka").setLevel(logging.DEBUG if verbose else logging.WARNING)


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
    from pipeline.server_process import run_server

    run_server(Settings(), host=host, port=port, max_runtime=max_runtime)


@token_app.command("issue")
def token_issue(
    device: str = typer.Option(..., help="device id the token is issued to"),
    model: list[str] = typer.Option(
        ..., help="model id it may push to and pull from; repeat it, or '*' alone for every model"
    ),
    ttl: int | None = typer.Option(None, help="lifetime in seconds (default FEDEX_TOKEN_TTL_S)"),
) -> None:
    """Print a bearer token signed with FEDEX_AUTH_SECRET (the model server's secret)."""
    import time

    from pipeline.auth import issue_token

    settings = Settings()
    if not settings.auth_secret:
        raise typer.BadParameter("set FEDEX_AUTH_SECRET to the model server's secret")
    try:  # '*' among model ids is refused, not widened to every model
        token = issue_token(
            settings.auth_secret, device, model, ttl or settings.token_ttl_s, time.time()
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    typer.echo(token)


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


#: The entry-point group every package registers its commands in.
COMMANDS_GROUP = "fedex.commands"
_assembled = False


def build_app() -> typer.Typer:
    """The whole ``fedex`` CLI: every installed package's commands added to ``app``
    (once)."""
    global _assembled
    if not _assembled:
        from importlib.metadata import entry_points

        for entry in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
            entry.load()(app)
        _assembled = True
    return app


def main() -> None:
    build_app()()
