"""``fedex devices --processes P``: one fleet in P worker processes, one report.

The parent prepares once (feature bank, models registered) and spawns P processes
(``multiprocessing`` *spawn*: no forked event loop or Kafka client). Worker ``i`` runs
:func:`device_sim.fleet.run_fleet` on shard ``i/P`` (devices ``g`` with ``g % P == i``, so
each device has the same profile whichever process runs it), with its own producer and
model subscriber, sends its progress to the parent through a pipe, and writes its summary
with per-device columns; the parent merges them (:func:`device_sim.report.merge_summaries`).

SIGINT/SIGTERM in a worker flush and report like Ctrl-C in one process; when the parent
is asked to stop it forwards SIGTERM to its workers and still merges what they report.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import multiprocessing
import os
import signal
import tempfile
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from pathlib import Path

import orjson

from device_sim.fleet import FleetReport, run_fleet
from device_sim.fleet_config import FleetConfig
from device_sim.fleet_setup import ensure_models, load_bank
from device_sim.report import FleetProgress, combine_progress, merge_summaries, write_json
from pipeline.errors import FedexError
from pipeline.settings import Settings

log = logging.getLogger(__name__)

ProgressCallback = Callable[[FleetProgress], Awaitable[None] | None]


class ShardError(FedexError):
    """A fleet worker process failed; the message names it and its exit code."""


def _worker(settings: Settings, config: FleetConfig, out: str, conn: Connection) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s shard %(name)s %(message)s")

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

        def progress(p: FleetProgress) -> None:
            with contextlib.suppress(OSError):
                conn.send_bytes(orjson.dumps(p.as_dict()))

        await run_fleet(settings, config, on_progress=progress, stop_event=stop, out=Path(out))

    asyncio.run(main())


async def run_sharded(
    settings: Settings,
    config: FleetConfig,
    processes: int,
    *,
    on_progress: ProgressCallback | None = None,
    stop_event: asyncio.Event | None = None,
    out: Path | None = None,
    prepare: bool = True,
) -> FleetReport:
    """Run ``config`` in ``processes`` worker processes and return the merged report."""
    if processes < 1:
        raise ShardError("--processes must be ≥ 1")
    stop_event = stop_event or asyncio.Event()
    if prepare and config.register:
        bank = await asyncio.to_thread(load_bank, settings, config, progress=True)
        await ensure_models(settings, bank, list(config.world_config().models))
    ctx = multiprocessing.get_context("spawn")
    workdir = Path(tempfile.mkdtemp(prefix="fedex-shards-"))
    workers = []
    for i in range(processes):
        shard = dataclasses.replace(
            config, shard_index=i, shard_count=processes, register=False, per_device=True
        )
        parent, child = ctx.Pipe(duplex=False)
        path = workdir / f"shard-{i}.json"
        proc = ctx.Process(
            target=_worker, args=(settings, shard, str(path), child), name=f"fleet-{i}"
        )
        proc.start()
        child.close()
        workers.append((proc, parent, path))
    latest: dict[int, FleetProgress] = {}
    forwarded = False
    try:
        while any(proc.is_alive() for proc, _, _ in workers):
            if stop_event.is_set() and not forwarded:
                forwarded = True
                for proc, _, _ in workers:
                    if proc.pid is not None and proc.is_alive():
                        os.kill(proc.pid, signal.SIGTERM)
            fresh = False
            for _, conn, _ in workers:
                with contextlib.suppress(EOFError, OSError):
                    while conn.poll():
                        data = orjson.loads(conn.recv_bytes())
                        latest[int(data["shard"])] = FleetProgress(**data)
                        fresh = True
            if fresh and on_progress is not None and len(latest) == processes:
                result = on_progress(combine_progress(list(latest.values())))
                if result is not None:
                    await result
            await asyncio.sleep(0.2)
    except BaseException:
        for proc, _, _ in workers:
            if proc.is_alive():
                proc.terminate()
        raise
    finally:
        for proc, conn, _ in workers:
            await asyncio.to_thread(proc.join, 30)
            conn.close()
    summaries = _collect([(proc.name, proc.exitcode, path) for proc, _, path in workers], workdir)
    report = FleetReport(merge_summaries(summaries, keep_columns=config.per_device))
    if out is not None:
        report.path = write_json(report.summary, out)
    return report


def _collect(workers: list[tuple[str, int | None, Path]], workdir: Path) -> list[dict]:
    """The workers' summaries (then their files are removed)."""
    failed = [(name, code) for name, code, path in workers if not path.is_file()]
    if failed:
        raise ShardError(
            f"fleet workers {failed} ended without a report (exit codes); see their logs above"
        )
    summaries = [orjson.loads(path.read_bytes()) for _, _, path in workers]
    for _, _, path in workers:
        path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        workdir.rmdir()
    return summaries
