"""``fedex devices`` at a terminal: live progress, Ctrl-C handling, summary and JSON.

The entry point owns the signal handlers (as the house style asks): the first Ctrl-C or
SIGTERM sets the fleet's stop event, which flushes in-flight pushes and reports; a second
Ctrl-C aborts.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from device_sim.fleet import FleetReport, run_fleet
from device_sim.fleet_config import FleetConfig
from device_sim.report import FleetProgress, print_summary
from device_sim.shards import run_sharded
from pipeline.settings import Settings


def default_out(settings: Settings) -> Path:
    return settings.home / "fleet" / f"devices-{time.strftime('%Y%m%d-%H%M%S')}.json"


def _table(p: FleetProgress) -> Table:
    day, rest = divmod(p.sim_s, 86400.0)
    table = Table(title=f"fleet — {p.wall_s:.0f} s, simulated day {int(day)} {rest / 3600:.1f} h")
    for col in (
        "devices online",
        "pushes/s",
        "samples/s",
        "pushes",
        "retries",
        "in flight",
        "versions seen",
        "mean accuracy",
    ):
        table.add_column(col, justify="right")
    table.add_row(
        f"{p.online:,}/{p.devices:,}",
        f"{p.pushes_per_s:,.0f}",
        f"{p.samples_per_s:,.0f}",
        f"{p.pushes:,}",
        f"{p.retries:,}",
        f"{p.in_flight:,}",
        f"{p.versions}",
        f"{p.mean_accuracy:.1%}",
    )
    return table


async def _run(
    settings: Settings, config: FleetConfig, processes: int, out: Path, console: Console
) -> FleetReport:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        console.print("[yellow]stopping: flushing in-flight pushes…[/yellow]")
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        with Live(console=console, refresh_per_second=2, transient=False) as live:

            def show(p: FleetProgress) -> None:
                live.update(_table(p))

            if processes > 1:
                return await run_sharded(
                    settings, config, processes, on_progress=show, stop_event=stop, out=out
                )
            return await run_fleet(settings, config, on_progress=show, stop_event=stop, out=out)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)


def run_devices(
    settings: Settings, config: FleetConfig, *, processes: int = 1, out: Path | None = None
) -> FleetReport:
    """``fedex devices``: run the fleet with a live view, print the summary, write JSON."""
    from pipeline.stack import kafka_for

    console = Console()
    out = out or default_out(settings)

    async def main() -> FleetReport:
        async with kafka_for(settings) as bootstrap:
            live = settings.model_copy(update={"kafka_bootstrap": bootstrap})
            return await _run(live, config, processes, out, console)

    report = asyncio.run(main())
    print_summary(report.summary, console)
    console.print(f"wrote {report.path}")
    return report
