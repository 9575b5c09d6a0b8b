"""The ``fedex`` command: one entry point for every actor, benchmark and tool.

Commands import their heavy modules (torch, faust) lazily so that ``fedex kafka`` and
``fedex topics`` start fast.
"""

from __future__ import annotations

import logging

import typer

from pipeline.cli_kafka import kafka_app, topics_app

app = typer.Typer(no_args_is_help=True, add_completion=False, help="FedEx Stream: feature-based user-adaptive training on Kafka.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: print a table and write JSON.")
app.add_typer(kafka_app, name="kafka")
app.add_typer(topics_app, name="topics")
app.add_typer(bench_app, name="bench")


@app.callback()
def _setup(verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logging")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )


def main() -> None:
    app()
