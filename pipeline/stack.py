"""The local stack an entry point needs: a Kafka cluster and the project's topics.

``kafka_for(settings)`` yields a bootstrap address: the external cluster when
``FEDEX_KAFKA_BOOTSTRAP`` is set, the broker of ``fedex kafka start`` when one runs, and
otherwise a broker owned by this process (it dies with it).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from pipeline import kafka_config, kafka_daemon, kafka_local
from pipeline.settings import Settings
from pipeline.topics import ensure_topics, topic_specs

log = logging.getLogger(__name__)


def broker_message_max_bytes(settings: Settings) -> int:
    """The broker's ``message.max.bytes``: room for the model topic's largest message."""
    return max(
        kafka_config.DEFAULT_MESSAGE_MAX_BYTES, settings.max_message_bytes + kafka_config.MIB
    )


def own_broker(settings: Settings, *, start_timeout: float) -> kafka_local.LocalKafka:
    """A broker under ``<home>/kafka`` owned by this process (it dies with it), configured
    by ``settings``; not started."""
    paths = kafka_local.KafkaPaths.under(settings.home)
    return kafka_local.LocalKafka(
        work_dir=paths.root,
        port=settings.kafka_port,
        heap=settings.kafka_heap,
        message_max_bytes=broker_message_max_bytes(settings),
        start_timeout=start_timeout,
        pidfile=paths.pidfile,
    )


@asynccontextmanager
async def kafka_for(settings: Settings, *, start_timeout: float = 120.0) -> AsyncIterator[str]:
    from pipeline.clients import wait_for_kafka

    if settings.uses_external_kafka:
        await wait_for_kafka(settings.bootstrap, timeout=30)
        yield settings.bootstrap
        return
    paths = kafka_local.KafkaPaths.under(settings.home)
    daemon = kafka_daemon.running_daemon(paths)
    if daemon is not None:
        log.info("using the local broker of `fedex kafka start` on %s", daemon.bootstrap)
        yield daemon.bootstrap
        return
    async with own_broker(settings, start_timeout=start_timeout) as kafka:
        log.info("started a local broker on %s for this run", kafka.bootstrap)
        yield kafka.bootstrap


@asynccontextmanager
async def stack_for(settings: Settings) -> AsyncIterator[Settings]:
    """Kafka plus ensured topics; yields the settings with the bootstrap actually in use."""
    async with kafka_for(settings) as bootstrap:
        effective = settings.model_copy(update={"kafka_bootstrap": bootstrap})
        await ensure_topics(bootstrap, topic_specs(effective))
        yield effective
