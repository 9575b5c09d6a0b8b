"""``fedex bench fleet``: how many simulated devices one process and one machine carry.

Three measurements on one broker (``FEDEX_KAFKA_BOOTSTRAP``, the ``fedex kafka start``
daemon, or a broker owned by the bench), each with its own topics:

1. **One process, 10,000 devices** (a fresh worker process) for a fixed window (default
   device model, daily rhythm, simulated transfer time): peak RSS of the process as the
   kernel's high-water mark (``VmHWM``) and its steady RSS (median of the samples of the
   second half), event-loop lag p50/p99 with n (how late ``sleep(20 ms)`` wakes up),
   sustained pushes/s and samples/s (after a warm-up that excludes the start-up burst of
   backlogged devices).
2. **Fan-out, as a user sees it**: per device, from the version's producer ack to its
   head swapped, with each device's simulated download of the checkpoint on its network
   tier; the distribution over every device of ≥ 20 versions. Beside it the same with the
   transfer off (the consumer's own latency: every device swaps in one vectorised step).
3. **100,000 devices across processes** (``--processes``, default 10): per-process RSS and
   loop lag, fleet-wide sustained pushes/s.

Targets (issue 4): ≤ 1 GB RSS and loop lag p99 ≤ 50 ms for 10,000 devices in a process;
fan-out p99 ≤ 2 s; 100,000 devices on this 2-core machine. The machine is shared: each
number is one run, reported as measured.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from device_sim.fleet import FleetConfig
from device_sim.fleet_config import FleetSchedule
from device_sim.fleet_setup import ensure_models, load_bank
from device_sim.report import FleetProgress
from device_sim.shards import run_sharded
from lab.benchio import write_result
from lab.measure import describe
from pipeline.settings import Settings
from pipeline.tables import print_table


@dataclass(frozen=True)
class FleetBenchConfig:
    devices: int = 10_000
    seconds: float = 30.0
    warmup_s: float = 8.0
    fanout_devices: int = 10_000
    fanout_versions: int = 20
    big_devices: int = 100_000
    big_processes: int = 10
    big_seconds: float = 45.0


class Sustained:
    """Pushes/s and samples/s between the first progress sample after the warm-up and the
    last one (the start-up burst of devices with a backlog is excluded)."""

    def __init__(self, warmup_s: float) -> None:
        self.warmup_s = warmup_s
        self.first: FleetProgress | None = None
        self.last: FleetProgress | None = None
        self.started = time.monotonic()

    def __call__(self, p: FleetProgress) -> None:
        if time.monotonic() - self.started < self.warmup_s:
            return
        if self.first is None:
            self.first = p
        self.last = p

    def rates(self) -> dict[str, float]:
        a, b = self.first, self.last
        if a is None or b is None or b.wall_s <= a.wall_s:
            return {"pushes_s": float("nan"), "samples_s": float("nan"), "window_s": 0.0}
        span = b.wall_s - a.wall_s
        return {
            "pushes_s": (b.pushes - a.pushes) / span,
            "samples_s": (b.samples - a.samples) / span,
            "window_s": span,
        }


async def _run_fleet(
    live: Settings, devices: int, seconds: float, processes: int, sustained: Sustained
) -> dict[str, Any]:
    """The summary of ``devices`` devices over ``processes`` fresh worker processes for
    ``seconds`` (on the bench's models, already registered), rates sampled by ``sustained``."""
    config = FleetConfig(count=devices, schedule=FleetSchedule(duration_s=seconds), register=False)
    report = await run_sharded(live, config, processes, on_progress=sustained, prepare=False)
    return report.summary


async def _one_process(live: Settings, config: FleetBenchConfig) -> dict[str, Any]:
    """In a fresh worker process, so its RSS is the fleet's, not the bench's (which built
    the bank and trained base heads)."""
    sustained = Sustained(config.warmup_s)
    started = time.monotonic()
    s = await _run_fleet(live, config.devices, config.seconds, 1, sustained)
    proc = s["processes"][0]
    return {
        "devices": config.devices,
        "seconds": s["wall_s"],
        "setup_s": time.monotonic() - started - s["wall_s"],
        "rss_peak_mb": proc["rss_peak_mb"],
        "rss_steady_mb": proc.get("rss_steady_mb"),
        "rss_peak_sampled_mb": proc.get("rss_peak_sampled_mb"),
        "loop_lag_ms": proc["loop_lag_ms"],
        "sustained": sustained.rates(),
        "overall_pushes_s": s["totals"]["pushes_per_s"],
        "pushes": s["totals"]["pushes"],
        "samples_pushed": s["totals"]["samples_pushed"],
        "retries": s["totals"]["retries"],
        "versions": len(s["versions"]),
    }


async def _multi_process(live: Settings, config: FleetBenchConfig) -> dict[str, Any]:
    sustained = Sustained(config.warmup_s)
    started = time.monotonic()
    b = await _run_fleet(
        live, config.big_devices, config.big_seconds, config.big_processes, sustained
    )
    return {
        "devices": config.big_devices,
        "processes": config.big_processes,
        "elapsed_s": time.monotonic() - started,
        "seconds": b["wall_s"],
        "sustained": sustained.rates(),
        "pushes": b["totals"]["pushes"],
        "samples_pushed": b["totals"]["samples_pushed"],
        "per_process": b["processes"],
        "rss_total_mb": sum(p["rss_peak_mb"] for p in b["processes"]),
        "rss_max_mb": max(p["rss_peak_mb"] for p in b["processes"]),
        "loop_lag_p99_max_ms": max(p["loop_lag_ms"]["p99"] for p in b["processes"]),
    }


async def _bench(
    settings: Settings, config: FleetBenchConfig, console: Console, keep: bool
) -> dict[str, Any]:
    from lab.bench_broker import bench_kafka
    from lab.subscription_bench import measure_fanout
    from pipeline.topics import ensure_topics, topic_specs

    result: dict[str, Any] = {"config": config.__dict__}
    async with bench_kafka(settings, keep=keep) as bootstrap:
        live = settings.model_copy(
            update={
                "kafka_bootstrap": bootstrap,
                "topic_prefix": f"bench-fleet-{uuid.uuid4().hex[:8]}",
            }
        )
        await ensure_topics(bootstrap, topic_specs(live))
        base = FleetConfig(register=False)
        bank = await asyncio.to_thread(load_bank, live, base, progress=True)
        await ensure_models(live, bank, list(base.world_config().models))
        console.print(
            f"[bold]1/3[/bold] {config.devices:,} devices in one process, {config.seconds:g} s"
        )
        result["one_process"] = await _one_process(live, config)
        console.print(f"[bold]2/3[/bold] fan-out to {config.fanout_devices:,} devices")
        for key, network in (("fanout", True), ("fanout_transfer_off", False)):
            result[key] = await measure_fanout(
                bootstrap=bootstrap,
                bank=bank,
                devices=config.fanout_devices,
                updates=config.fanout_versions,
                network=network,
            )
        if config.big_devices > 0:
            console.print(
                f"[bold]3/3[/bold] {config.big_devices:,} devices in "
                f"{config.big_processes} processes, {config.big_seconds:g} s"
            )
            result["multi_process"] = await _multi_process(live, config)
    return result


def run_fleet_bench(
    settings: Settings, config: FleetBenchConfig, out: Path | None, *, keep: bool = False
) -> dict[str, Any]:
    console = Console()
    result = asyncio.run(_bench(settings, config, console, keep))
    one = result["one_process"]
    rows: list[list[Any]] = [
        ["1 process: devices", one["devices"], ""],
        ["1 process: peak RSS, VmHWM (MB)", one["rss_peak_mb"], "≤ 1024"],
        ["1 process: steady RSS (MB)", one["rss_steady_mb"], ""],
        ["1 process: loop lag (ms)", describe(one["loop_lag_ms"], "ms"), "p99 ≤ 50"],
        ["1 process: sustained pushes/s", one["sustained"]["pushes_s"], ""],
        ["1 process: sustained samples/s", one["sustained"]["samples_s"], ""],
        [
            "fan-out per device, network tiers",
            describe(result["fanout"]["per_device_from_ack_s"]),
            "",
        ],
        [
            "fan-out to 99% per version, network tiers",
            describe(result["fanout"]["fanout_from_ack_s"]),
            "≤ 2 s",
        ],
        [
            "fan-out to 99% per version, transfer off",
            describe(result["fanout_transfer_off"]["fanout_from_ack_s"]),
            "",
        ],
    ]
    big = result.get("multi_process")
    if big:
        rows += [
            [f"{big['processes']} processes: devices", big["devices"], "100,000"],
            [
                "multi: RSS max / total (MB)",
                f"{big['rss_max_mb']:.0f} / {big['rss_total_mb']:.0f}",
                "",
            ],
            ["multi: loop lag p99, worst process (ms)", big["loop_lag_p99_max_ms"], ""],
            ["multi: sustained pushes/s", big["sustained"]["pushes_s"], ""],
            ["multi: sustained samples/s", big["sustained"]["samples_s"], ""],
        ]
    print_table("fedex bench fleet", ["metric", "measured", "target"], rows, console)
    path = write_result("fleet", result, out)
    console.print(f"wrote {path}")
    return result
