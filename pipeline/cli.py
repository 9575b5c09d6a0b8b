"""The ``fedex`` command: one entry point for every actor, benchmark and tool.

Commands import their heavy modules (torch, faust) lazily so that ``fedex kafka`` and
``fedex topics`` start fast. Each command builds the process's one ``Settings``.
"""

from __future__ import annotations

import asyncio
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
def demo() -> None:
    """The main job on the embedded default stack (see the README)."""
    from pipeline.demo import run_demo

    run_demo(Settings())


def main() -> None:
    app()
