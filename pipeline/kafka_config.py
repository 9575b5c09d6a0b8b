"""The local broker's configuration, pure: ``server.properties`` for a single-node KRaft
broker, the JVM and storage-format command lines, cluster ids. No I/O: unit-tested
without Java; :mod:`pipeline.kafka_local` runs what these describe."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Mapping
from pathlib import Path

MIB = 1024 * 1024
#: Broker-wide max record batch size; the model topic (8 MiB by default) must fit under it.
DEFAULT_MESSAGE_MAX_BYTES = 16 * MIB
MAIN_CLASS = "kafka.Kafka"


def new_cluster_id() -> str:
    """A KRaft cluster id: a random UUID as 22 chars of URL-safe base64, like ``kafka-storage
    random-uuid``. Kafka never hands out ids starting with '-' (they read as CLI flags)."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode("ascii")
        if not cid.startswith("-"):
            return cid


def broker_properties(
    *,
    port: int,
    controller_port: int,
    data_dir: Path,
    host: str = "127.0.0.1",
    node_id: int = 1,
    message_max_bytes: int = DEFAULT_MESSAGE_MAX_BYTES,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """``server.properties`` of a single-node combined broker+controller on loopback.

    Replication factors are 1 and the internal topics small so a 256 MB heap suffices.
    ``extra`` overrides or adds properties (tests use it to break the broker on purpose).
    """
    if port == controller_port:
        raise ValueError(f"broker and controller need distinct ports, both are {port}")
    props = {
        "process.roles": "broker,controller",
        "node.id": str(node_id),
        "controller.quorum.voters": f"{node_id}@{host}:{controller_port}",
        "listeners": f"PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://{host}:{port}",
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "inter.broker.listener.name": "PLAINTEXT",
        "log.dirs": str(data_dir),
        "num.partitions": "1",
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
        "log.cleaner.dedupe.buffer.size": str(8 * MIB),
        "message.max.bytes": str(message_max_bytes),
        # A request carries at least one full batch; keep the 100 MiB default or more.
        "socket.request.max.bytes": str(max(100 * MIB, message_max_bytes + MIB)),
        "replica.fetch.max.bytes": str(message_max_bytes),
    }
    props.update(extra or {})
    return props


def render_properties(props: Mapping[str, str]) -> str:
    """Java ``.properties`` text. Backslashes are escaped; values here never span lines."""
    lines = ["# Written by pipeline.kafka_local; rewritten at every start."]
    for key, value in props.items():
        if "\n" in key or "\n" in value:
            raise ValueError(f"property {key!r} contains a newline")
        lines.append(f"{key}={value.replace(chr(92), chr(92) * 2)}")
    return "\n".join(lines) + "\n"


def parse_properties(text: str) -> dict[str, str]:
    """The inverse of :func:`render_properties` (enough for files we wrote)."""
    props: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#!":
            continue
        key, _, value = line.partition("=")
        props[key.strip()] = value.strip().replace("\\\\", "\\")
    return props


def java_command(
    *,
    java: str,
    libs_dir: Path,
    heap: str,
    log4j_config: Path,
    server_properties: Path,
) -> list[str]:
    """The JVM command line of the broker. ``server_properties`` is the last argument; the
    pidfile check relies on it to tell our broker from any other java process."""
    return [
        java,
        f"-Xmx{heap}",
        f"-Xms{heap}",
        "-XX:+ExitOnOutOfMemoryError",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={log4j_config}",
        "-cp",
        f"{libs_dir}/*",
        MAIN_CLASS,
        str(server_properties),
    ]


def storage_format_command(
    *, java: str, libs_dir: Path, cluster_id: str, server_properties: Path
) -> list[str]:
    return [
        java,
        "-Xmx128m",
        "-cp",
        f"{libs_dir}/*",
        "kafka.tools.StorageTool",
        "format",
        "-t",
        cluster_id,
        "-c",
        str(server_properties),
    ]
