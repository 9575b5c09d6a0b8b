"""Kafka client factories with the project's defaults, and a readiness probe.

Every actor builds its aiokafka clients here so that the settings that must agree with the
topic configs (request and fetch sizes for 8 MiB model messages, acks, manual commits) are
chosen once. Factories take plain keyword arguments; extra aiokafka options pass through
``**options`` and win over the defaults.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from pipeline.errors import ConfigError, KafkaUnavailableError
from pipeline.kafka_local import port_accepts

MIB = 1024 * 1024
#: Large enough for one model message (8 MiB by default) plus framing.
DEFAULT_MAX_REQUEST_SIZE = 16 * MIB


def make_producer(
    *,
    bootstrap: str,
    client_id: str = "fedex",
    acks: int | str = "all",
    max_request_size: int = DEFAULT_MAX_REQUEST_SIZE,
    linger_ms: int = 5,
    max_batch_size: int = 1 * MIB,
    compression_type: str | None = None,
    enable_idempotence: bool = False,
    request_timeout_ms: int = 30_000,
    **options: Any,
) -> AIOKafkaProducer:
    """An unstarted producer. ``acks="all"``: an output counts as durable only when written.

    Pass ``max_request_size`` >= the largest record you send (e.g. settings.max_message_bytes
    plus headroom); the topic's ``max.message.bytes`` still applies on the broker.
    """
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        client_id=client_id,
        acks=acks,
        max_request_size=max_request_size,
        linger_ms=linger_ms,
        max_batch_size=max_batch_size,
        compression_type=compression_type,
        enable_idempotence=enable_idempotence,
        request_timeout_ms=request_timeout_ms,
        **options,
    )


def make_consumer(
    *topics: str,
    bootstrap: str,
    group_id: str | None,
    client_id: str = "fedex",
    auto_offset_reset: str = "earliest",
    enable_auto_commit: bool = False,
    max_partition_fetch_bytes: int = DEFAULT_MAX_REQUEST_SIZE,
    fetch_max_bytes: int = 64 * MIB,
    isolation_level: str = "read_committed",
    **options: Any,
) -> AIOKafkaConsumer:
    """An unstarted consumer. Commits are manual (``enable_auto_commit=False``): actors commit
    only after their output is durable. ``group_id=None`` for a group-less reader (e.g. one
    that rebuilds a registry with ``assign``/``seek``)."""
    return AIOKafkaConsumer(
        *topics,
        bootstrap_servers=bootstrap,
        group_id=group_id,
        client_id=client_id,
        auto_offset_reset=auto_offset_reset,
        enable_auto_commit=enable_auto_commit,
        max_partition_fetch_bytes=max_partition_fetch_bytes,
        fetch_max_bytes=fetch_max_bytes,
        isolation_level=isolation_level,
        **options,
    )


async def assign_all_partitions(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """Assign every partition of ``topic`` to a started group-less ``consumer`` and return
    them in order; the caller seeks. A missing topic is a :class:`ConfigError` that says how
    to create it.

    A consumer without subscriptions has no topic metadata yet, and aiokafka has no public
    call for the partitions of a topic it is not subscribed to: this fetches every topic's
    metadata (asking for the one topic could auto-create it).
    """
    cluster = await consumer._client.fetch_all_metadata()
    partitions = cluster.partitions_for_topic(topic)
    if not partitions:
        raise ConfigError(f"topic {topic!r} does not exist: run `fedex topics ensure`")
    tps = [TopicPartition(topic, p) for p in sorted(partitions)]
    consumer.assign(tps)
    return tps


async def start_reader_at_end(*, bootstrap: str, topic: str, client_id: str) -> AIOKafkaConsumer:
    """A started group-less consumer on every partition of ``topic``, positioned at its
    end now: it reads exactly the records produced after this call returns."""
    consumer = make_consumer(bootstrap=bootstrap, group_id=None, client_id=client_id)
    await consumer.start()
    try:
        tps = await assign_all_partitions(consumer, topic)
        await consumer.seek_to_end(*tps)
        for tp in tps:  # resolve the lazy seek now, not at the first fetch
            await consumer.position(tp)
    except BaseException:
        await consumer.stop()
        raise
    return consumer


async def start_reader_and_producer(
    *, bootstrap: str, topic: str, client_id: str
) -> tuple[AIOKafkaConsumer, AIOKafkaProducer]:
    """A started :func:`start_reader_at_end` consumer on ``topic`` and a started producer,
    both named ``client_id``; neither is left running if the other fails to start."""
    consumer = await start_reader_at_end(bootstrap=bootstrap, topic=topic, client_id=client_id)
    producer = make_producer(bootstrap=bootstrap, client_id=client_id)
    try:
        await producer.start()
    except BaseException:
        await consumer.stop()
        raise
    return consumer, producer


async def stop_clients(*clients: AIOKafkaProducer | AIOKafkaConsumer | None) -> None:
    """Stop each started client in turn, skipping the ``None`` ones."""
    for client in clients:
        if client is not None:
            await client.stop()


def metadata_probe(client: AIOKafkaProducer | AIOKafkaConsumer) -> Callable[[], Awaitable[object]]:
    """A probe for :class:`~pipeline.broker_health.BrokerHealth`: one metadata request over
    a started client's connections (raises when no broker answers)."""
    inner = client.client if isinstance(client, AIOKafkaProducer) else client._client
    return inner.fetch_all_metadata


def make_admin(
    *, bootstrap: str, client_id: str = "fedex-admin", request_timeout_ms: int = 30_000
) -> AIOKafkaAdminClient:
    """An unstarted admin client (``await admin.start()``, ``await admin.close()``)."""
    return AIOKafkaAdminClient(
        bootstrap_servers=bootstrap,
        client_id=client_id,
        request_timeout_ms=request_timeout_ms,
    )


def _servers(bootstrap: str) -> list[tuple[str, int]]:
    servers = []
    for item in bootstrap.split(","):
        host, sep, port = item.strip().rpartition(":")
        servers.append((host.strip("[]"), int(port)) if sep else (item.strip(), 9092))
    return servers


async def wait_for_kafka(bootstrap: str, timeout: float = 30.0) -> None:
    """Return once the cluster at ``bootstrap`` answers a metadata request.

    Polls until ``timeout`` seconds have passed, then raises KafkaUnavailableError naming
    the bootstrap servers and the last error seen.
    """
    deadline = time.monotonic() + timeout
    last_error = "no connection attempt finished"
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        # A plain TCP probe first: aiokafka logs an ERROR for every refused connection.
        reachable = False
        for host, port in _servers(bootstrap):
            if await port_accepts(host, port, min(1.0, remaining)):
                reachable = True
                break
        if not reachable:
            last_error = "connection refused or timed out"
        else:
            admin = make_admin(
                bootstrap=bootstrap,
                client_id="fedex-probe",
                request_timeout_ms=max(1000, int(remaining * 1000)),
            )
            try:
                await asyncio.wait_for(admin.start(), max(0.1, deadline - time.monotonic()))
                return
            except (KafkaError, OSError, TimeoutError) as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            finally:
                with contextlib.suppress(Exception):
                    await admin.close()
        await asyncio.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
    raise KafkaUnavailableError(
        f"Kafka at {bootstrap} did not answer within {timeout:g} s ({last_error}). Start the "
        "local broker with `fedex kafka start`, or check FEDEX_KAFKA_BOOTSTRAP."
    )
