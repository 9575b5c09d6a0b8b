"""The detached broker of ``fedex kafka start|stop|status``: found again through its pidfile."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import KafkaUnavailableError
from pipeline.kafka_config import DEFAULT_MESSAGE_MAX_BYTES
from pipeline.kafka_jars import POM_PATH, kafka_version
from pipeline.kafka_local import (
    BrokerRecord,
    KafkaPaths,
    LocalKafka,
    is_broker_process,
    read_pidfile,
    split_bootstrap,
)
from pipeline.processes import terminate_pid

log = logging.getLogger(__name__)


def running_daemon(paths: KafkaPaths) -> BrokerRecord | None:
    """The record of the detached broker of ``paths`` if it runs; removes a stale pidfile."""
    record = read_pidfile(paths.pidfile)
    if record is None:
        return None
    if is_broker_process(record.pid, record.server_properties):
        return record
    log.info("removing stale pidfile %s (pid %d is not our broker)", paths.pidfile, record.pid)
    paths.pidfile.unlink(missing_ok=True)
    return None


async def start_daemon(
    *,
    home: Path,
    port: int,
    heap: str,
    message_max_bytes: int = DEFAULT_MESSAGE_MAX_BYTES,
    start_timeout: float = 90.0,
) -> tuple[BrokerRecord, bool]:
    """Start the detached broker under ``<home>/kafka`` unless it runs already.

    Returns its record and whether this call started it.
    """
    paths = KafkaPaths.under(home)
    existing = running_daemon(paths)
    if existing is not None:
        return existing, False
    kafka = LocalKafka(
        work_dir=paths.root,
        port=port,
        heap=heap,
        message_max_bytes=message_max_bytes,
        start_timeout=start_timeout,
        detached=True,
        pidfile=paths.pidfile,
    )
    await kafka.start()
    assert kafka.record is not None
    return kafka.record, True


async def stop_daemon(*, home: Path, grace: float = 30.0) -> BrokerRecord | None:
    """Stop the detached broker of ``<home>/kafka``. Returns its record, None if none ran."""
    paths = KafkaPaths.under(home)
    record = running_daemon(paths)
    if record is None:
        return None
    await asyncio.to_thread(terminate_pid, record.pid, timeout=grace, group=True)
    paths.pidfile.unlink(missing_ok=True)
    return record


@dataclass(frozen=True, slots=True)
class KafkaStatus:
    """What ``fedex kafka status`` reports."""

    external: bool
    bootstrap: str
    reachable: bool
    running: bool
    pid: int | None
    port: int | None
    data_dir: str | None
    log: str | None
    version: str
    error: str | None = None


async def kafka_status(
    *, home: Path, bootstrap: str, external: bool, probe_seconds: float = 3.0
) -> KafkaStatus:
    """The local daemon's state (unless ``external``) and whether ``bootstrap`` answers."""
    from pipeline.clients import wait_for_kafka  # aiokafka only when asked

    paths = KafkaPaths.under(home)
    record = None if external else running_daemon(paths)
    error = None
    try:
        await wait_for_kafka(bootstrap, timeout=probe_seconds)
        reachable = True
    except KafkaUnavailableError as exc:
        reachable, error = False, str(exc)
    _, port = split_bootstrap(bootstrap)
    return KafkaStatus(
        external=external,
        bootstrap=bootstrap,
        reachable=reachable,
        running=record is not None,
        pid=record.pid if record else None,
        port=record.port if record else (None if external else port),
        data_dir=record.data_dir if record else (None if external else str(paths.data)),
        log=str(paths.log) if not external else None,
        version=record.version if record else kafka_version(POM_PATH.read_text()),
        error=error,
    )
