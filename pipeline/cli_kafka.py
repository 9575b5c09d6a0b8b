"""``fedex kafka …`` (the local broker) and ``fedex topics …`` (topic specs on a cluster).

Kept free of torch and faust imports so these commands start in well under a second.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from pipeline import kafka_daemon, kafka_local
from pipeline.errors import FedexError
from pipeline.settings import Settings
from pipeline.stack import broker_message_max_bytes, own_broker

T = TypeVar("T")

kafka_app = typer.Typer(no_args_is_help=True, help="The local Kafka broker (no Docker needed).")
topics_app = typer.Typer(no_args_is_help=True, help="Create, repair and describe the topics.")

console = Console()
err_console = Console(stderr=True)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine; a FedexError becomes a red message and exit status 1."""
    try:
        return asyncio.run(coro)
    except FedexError as exc:
        err_console.print(f"[red]error:[/red] {exc}", markup=True, highlight=False)
        raise typer.Exit(1) from None


# --------------------------------------------------------------------------- fedex kafka


@kafka_app.command("start")
def kafka_start(
    foreground: bool = typer.Option(
        False, "--foreground", help="run attached until Ctrl-C instead of as a daemon"
    ),
    timeout: float = typer.Option(90.0, help="seconds to wait for the broker to be ready"),
) -> None:
    """Start the local broker in the background and return once it serves requests."""
    settings = Settings()
    if settings.uses_external_kafka:
        console.print(
            f"FEDEX_KAFKA_BOOTSTRAP is set: using the cluster at {settings.bootstrap}; "
            "no local broker started."
        )
        return
    if foreground:
        _run(_run_foreground(settings, timeout))
        return
    record, started = _run(
        kafka_daemon.start_daemon(
            home=settings.home,
            port=settings.kafka_port,
            heap=settings.kafka_heap,
            message_max_bytes=broker_message_max_bytes(settings),
            start_timeout=timeout,
        )
    )
    verb = "started" if started else "already running"
    console.print(
        f"Kafka {record.version} {verb} on {record.bootstrap} (pid {record.pid})\n"
        f"  data: {record.data_dir}\n  log:  {record.log}",
        highlight=False,
    )


async def _run_foreground(settings: Settings, start_timeout: float) -> None:
    paths = kafka_local.KafkaPaths.under(settings.home)
    if kafka_daemon.running_daemon(paths) is not None:
        raise FedexError(f"a local broker already runs from {paths.root}; `fedex kafka stop` first")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with own_broker(settings, start_timeout=start_timeout) as kafka:
        console.print(f"Kafka running on {kafka.bootstrap} (pid {kafka.pid}); Ctrl-C stops it")
        await stop.wait()
        console.print("stopping…")


@kafka_app.command("stop")
def kafka_stop(
    timeout: float = typer.Option(30.0, help="seconds of graceful shutdown before SIGKILL"),
) -> None:
    """Stop the local broker started by `fedex kafka start`."""
    settings = Settings()
    if settings.uses_external_kafka:
        console.print(f"using the external cluster at {settings.bootstrap}; nothing to stop.")
        return
    record = _run(kafka_daemon.stop_daemon(home=settings.home, grace=timeout))
    if record is None:
        console.print("no local Kafka broker is running.")
    else:
        console.print(f"stopped Kafka broker pid {record.pid} ({record.bootstrap}).")
    root = kafka_local.KafkaPaths.under(settings.home).root.resolve()
    strays = kafka_local.find_broker_processes(root)
    if strays:
        err_console.print(
            f"[yellow]note:[/yellow] broker processes without a pidfile still use {root}: "
            f"pids {strays} (a `fedex kafka start --foreground` or an orphan; kill them if stale)"
        )


@kafka_app.command("status")
def kafka_status(
    timeout: float = typer.Option(3.0, help="seconds to wait for the cluster to answer"),
) -> None:
    """Is the broker running and reachable? Exit status 1 when it is not reachable."""
    settings = Settings()
    status = _run(
        kafka_daemon.kafka_status(
            home=settings.home,
            bootstrap=settings.bootstrap,
            external=settings.uses_external_kafka,
            probe_seconds=timeout,
        )
    )
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("mode", "external cluster" if status.external else "local broker")
    table.add_row("bootstrap", status.bootstrap)
    table.add_row("reachable", "[green]yes[/green]" if status.reachable else "[red]no[/red]")
    if not status.external:
        table.add_row("running", f"yes (pid {status.pid})" if status.running else "no")
        table.add_row("port", str(status.port))
        table.add_row("data dir", str(status.data_dir))
        table.add_row("log", str(status.log))
        table.add_row("version", status.version)
    if status.error and not status.reachable:
        table.add_row("error", status.error)
    console.print(table)
    if not status.reachable:
        raise typer.Exit(1)


@kafka_app.command("logs")
def kafka_logs(
    lines: int = typer.Option(50, "-n", "--lines", min=0, help="how many lines of the end"),
    follow: bool = typer.Option(False, "--follow", "-f", help="keep printing new lines"),
) -> None:
    """Print the end of the local broker's log."""
    settings = Settings()
    if settings.uses_external_kafka:
        console.print(f"using the external cluster at {settings.bootstrap}; no local log.")
        return
    path = kafka_local.KafkaPaths.under(settings.home).log
    if not path.exists():
        err_console.print(f"no broker log at {path} yet (`fedex kafka start`).")
        raise typer.Exit(1)
    tail = kafka_local.read_tail(path, lines)
    if tail:
        sys.stdout.write(tail + "\n")
        sys.stdout.flush()
    if follow:
        _follow(path)


def _follow(path: Path) -> None:
    with path.open("rb") as fh:
        fh.seek(0, 2)
        try:
            while True:
                chunk = fh.read()
                if chunk:
                    sys.stdout.write(chunk.decode("utf-8", "replace"))
                    sys.stdout.flush()
                else:
                    time.sleep(0.25)
        except KeyboardInterrupt:
            pass


# --------------------------------------------------------------------------- fedex topics


@topics_app.command("ensure")
def topics_ensure() -> None:
    """Create missing topics, add partitions, reset drifted configs (idempotent)."""
    from pipeline.topics import ensure_topics, topic_specs

    settings = Settings()
    report = _run(ensure_topics(settings.bootstrap, topic_specs(settings)))
    for topic in report.topics:
        colour = {"created": "green", "updated": "yellow"}.get(topic.action, "dim")
        line = "  ".join([topic.name, "; ".join(topic.changes())]).rstrip()
        console.print(f"[{colour}]{topic.action:>9}[/{colour}] {line}", highlight=False)
    for warning in report.warnings:
        console.print(f"[yellow]  warning[/yellow] {warning}", highlight=False)
    console.print(f"{report.summary()} on {settings.bootstrap}")


@topics_app.command("describe")
def topics_describe() -> None:
    """The topics as the cluster has them next to their purpose; drift is marked."""
    from pipeline.topics import describe_topics, topic_specs

    settings = Settings()
    descriptions = _run(describe_topics(settings.bootstrap, topic_specs(settings)))
    table = Table(title=f"topics on {settings.bootstrap}")
    for column in ("topic", "partitions", "cleanup.policy", "retention.ms", "max.message.bytes"):
        table.add_column(column, no_wrap=True)
    table.add_column("purpose")
    missing = 0
    for desc in descriptions:
        if desc.state is None:
            missing += 1
            table.add_row(desc.spec.name, "[red]missing[/red]", "", "", "", desc.spec.purpose)
            continue
        drift = desc.drift
        cells = []
        for name in ("cleanup.policy", "retention.ms", "max.message.bytes"):
            value = desc.config(name) or ""
            cells.append(f"[yellow]{value}*[/yellow]" if name in drift else value)
        partitions = str(desc.state.partitions)
        if desc.state.partitions != desc.spec.partitions:
            partitions = f"[yellow]{partitions}*[/yellow]"
        table.add_row(desc.spec.name, partitions, *cells, desc.spec.purpose)
    console.print(table)
    if missing or any(d.drift for d in descriptions if d.exists):
        console.print("* differs from the spec / missing: run `fedex topics ensure`")
