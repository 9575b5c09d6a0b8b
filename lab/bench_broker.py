"""The broker a benchmark runs on: found or started, recorded, and left as it was found.

:func:`bench_kafka` wraps :func:`pipeline.stack.kafka_for`. It records in the result's
conditions (:func:`lab.measure.note_broker`) whether the bench started the broker (cold:
a fresh JVM) or found one running (``fedex kafka start``, or an external cluster), and
on the way out deletes every topic the bench created (``keep=True`` keeps them) and
prints the disk the broker's data directory grew by.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from pipeline import clients, kafka_daemon, kafka_local
from pipeline.settings import Settings
from pipeline.stack import kafka_for

log = logging.getLogger(__name__)


def dir_bytes(path: Path) -> int | None:
    """Disk blocks taken by the files under ``path``, in bytes (not their apparent size:
    the broker preallocates sparse index files); None when it does not exist."""
    if not path.is_dir():
        return None
    total = 0
    for f in path.rglob("*"):
        with contextlib.suppress(OSError):
            if f.is_file():
                total += f.stat().st_blocks * 512
    return total


def broker_source(settings: Settings) -> str:
    """Who runs the broker this bench will use, before it is started."""
    if settings.uses_external_kafka:
        return "external"
    paths = kafka_local.KafkaPaths.under(settings.home)
    if kafka_daemon.running_daemon(paths) is not None:
        return "found running (fedex kafka start)"
    return "started by the bench"


async def single_partition_topics(bootstrap: str, prefix: str, home: Path) -> Settings:
    """Settings whose topics (under ``prefix``, created here) have one partition each: a
    bench that times single records reads every record of a model, in order, from one
    partition."""
    from pipeline.topics import ensure_topics, topic_specs

    settings = Settings(
        kafka_bootstrap=bootstrap,
        topic_prefix=prefix,
        home=home,
        features_partitions=1,
        triggers_partitions=1,
        models_partitions=1,
    )
    await ensure_topics(bootstrap, topic_specs(settings))
    return settings


async def list_topics(bootstrap: str) -> set[str]:
    admin = clients.make_admin(bootstrap=bootstrap)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


async def delete_topics(bootstrap: str, names: set[str]) -> None:
    """Deletes ``names`` (internal ``__`` topics never); errors are logged, not raised."""
    doomed = sorted(n for n in names if not n.startswith("__"))
    if not doomed:
        return
    admin = clients.make_admin(bootstrap=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics(doomed)
    except Exception as exc:  # cleanup must not turn a measured run into a failure
        log.warning("could not delete %d bench topics: %s", len(doomed), exc)
    finally:
        await admin.close()


@contextlib.asynccontextmanager
async def bench_kafka(
    settings: Settings, *, keep: bool = False, echo: Callable[[str], None] = print
) -> AsyncIterator[str]:
    """Yields the bootstrap of the broker to bench on; cleans up after the bench."""
    from lab import measure

    source = broker_source(settings)
    data_dir = kafka_local.KafkaPaths.under(settings.home).data
    started = time.perf_counter()
    async with kafka_for(settings) as bootstrap:
        measure.note_broker(
            {
                "source": source,
                "bootstrap": bootstrap,
                "cold": source == "started by the bench",
                "start_s": round(time.perf_counter() - started, 2),
            }
        )
        before = await list_topics(bootstrap)
        disk_before = None if settings.uses_external_kafka else dir_bytes(data_dir)
        try:
            yield bootstrap
        finally:
            with contextlib.suppress(Exception):
                created = await list_topics(bootstrap) - before
                disk_after = None if settings.uses_external_kafka else dir_bytes(data_dir)
                used = None if disk_after is None else disk_after - (disk_before or 0)
                measure.note_broker(
                    {"topics_created": len(created), "disk_used_bytes": used, "kept": keep}
                )
                if not keep:
                    await delete_topics(bootstrap, created)
                disk = "unknown (external broker)" if used is None else f"{used / 1e6:,.1f} MB"
                fate = "kept (--keep)" if keep else "deleted"
                echo(f"bench topics: {len(created)} created, {fate}; broker disk used {disk}")
