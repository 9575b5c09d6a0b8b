"""BrokerHealth's state and log lines, and the Kafka client noise it folds: no broker."""

from __future__ import annotations

import ast
import asyncio
import importlib
import inspect
import logging
import socket
from collections.abc import Iterator

import mode
import pytest
from prometheus_client import CollectorRegistry

from pipeline.broker_health import BrokerHealth, KafkaNoiseFilter, backoff_delays


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "pipeline.broker_health"]


def test_one_line_when_lost_one_when_back_with_the_outage_and_attempts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    registry = CollectorRegistry()
    health = BrokerHealth("trainer t", clock=clock, registry=registry)
    with caplog.at_level(logging.WARNING, logger="pipeline.broker_health"):
        health.ok()  # nothing to say while reachable
        for _ in range(5):
            health.failed(TimeoutError("no answer"))
            clock.now += 3
        assert registry.get_sample_value("fedex_broker_reachable") == 0.0
        health.ok()
        health.ok()
    assert lines(caplog) == [
        "trainer t: Kafka unreachable (no answer); retrying with backoff, one line when it is back",
        "trainer t: Kafka back after 15.0 s (5 failed attempts, 0 client errors folded)",
    ]
    assert registry.get_sample_value("fedex_broker_reachable") == 1.0
    assert registry.get_sample_value("fedex_broker_outages_total") == 1.0
    assert health.failed_attempts == 0


def test_a_summary_per_minute_while_down_and_folded_client_noise(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    health = BrokerHealth("worker", clock=clock)
    noise = KafkaNoiseFilter(health)

    def client_log(name: str, message: str, level: int = logging.ERROR) -> bool:
        return noise.filter(logging.LogRecord(name, level, __file__, 1, message, None, None))

    assert not client_log("aiokafka", "Unable connect to node with id 1: [Errno 111] refused")
    assert not client_log("aiokafka.consumer.fetcher", "Failed fetch messages from 1: x")
    assert client_log("aiokafka", "Unable connect to node", logging.INFO)  # below WARNING
    assert client_log("aiokafka.producer", "something else entirely")
    assert client_log("faust", "Unable connect to node")  # not the Kafka client
    with caplog.at_level(logging.WARNING, logger="pipeline.broker_health"):
        health.failed("refused")
        clock.now += 30
        health.summarize()  # under a minute: quiet
        clock.now += 31
        health.summarize()
        health.ok()
    said = lines(caplog)
    assert len(said) == 3
    assert said[1].startswith("worker: Kafka still unreachable after 61 s")
    assert "2 client errors folded" in said[2]


def test_backoff_doubles_to_its_cap_with_jitter() -> None:
    delays = backoff_delays(0.5, 4.0)
    got = [next(delays) for _ in range(6)]
    for value, nominal in zip(got, [0.5, 1, 2, 4, 4, 4], strict=True):
        assert 0.8 * nominal <= value <= 1.2 * nominal


# ------------------------------------------- the clients' own outage lines, as they log them

#: Every line aiokafka and Faust log per attempt or per partition while a broker is away:
#: (module whose logger logs it, level, its format string verbatim, arguments as in an
#: outage). ``test_the_table_is_the_installed_libraries`` checks each format string is in
#: that module's source, so the table cannot drift from the libraries it stands for.
OUTAGE_LINES = [
    ("aiokafka.client", logging.ERROR, 'Unable connect to "%s:%s": %s', ("broker", 9092, "")),
    (
        "aiokafka.client",
        logging.ERROR,
        'Unable connect to "%s:%s": %s',
        ("broker", 9092, "[Errno 111] Connect call failed ('127.0.0.1', 9092)"),
    ),
    (
        "aiokafka.client",
        logging.WARNING,
        'Unable to request metadata from "%s:%s": %s',
        ("broker", 9092, "RequestTimedOutError"),
    ),
    (
        "aiokafka.client",
        logging.WARNING,
        "Unable to request metadata from node with id %s: %r",
        (1, TimeoutError()),
    ),
    ("aiokafka.client", logging.ERROR, "Unable to update metadata from %s", ([1],)),
    (
        "aiokafka.client",
        logging.ERROR,
        "Unable connect to node with id %s: %s",
        (1, "[Errno 111] Connect call failed ('127.0.0.1', 9092)"),
    ),
    (
        "aiokafka.consumer.group_coordinator",
        logging.ERROR,
        "Error sending %s to node %s [%s] -- marking coordinator dead",
        ("HeartbeatRequest_v1", 1, "NodeNotReadyError: 1"),
    ),
    (
        "aiokafka.consumer.group_coordinator",
        logging.WARNING,
        "Marking the coordinator dead (node %s)for group %s.",
        (1, "g"),
    ),
    (
        "aiokafka.consumer.group_coordinator",
        logging.ERROR,
        "Group Coordinator Request failed: %s",
        ("[Error 15] CoordinatorNotAvailableError",),
    ),
    (
        "aiokafka.consumer.group_coordinator",
        logging.ERROR,
        "Heartbeat session expired - marking coordinator dead",
        (),
    ),
    (
        "aiokafka.consumer.group_coordinator",
        logging.ERROR,
        "Heartbeat send request failed: %s. Will retry.",
        ("KafkaConnectionError: Connection at broker:9092 closed",),
    ),
    (
        "aiokafka.consumer.group_coordinator",
        logging.WARNING,
        "Heartbeat failed for group %s: coordinator (node %s) is either not started or not valid",
        ("g", 1),
    ),
    (
        "aiokafka.consumer.fetcher",
        logging.ERROR,
        "Failed fetch messages from %s: %s",
        (1, "NodeNotReadyError: Attempt to send a request to node which is not ready"),
    ),
    (
        "aiokafka.consumer.fetcher",
        logging.ERROR,
        "Failed fetch offsets from %s: %s",
        (1, "RequestTimedOutError"),
    ),
    (
        "aiokafka.producer.sender",
        logging.ERROR,
        "FindCoordinator Request failed: %s",
        ("CoordinatorNotAvailableError",),
    ),
    (
        "aiokafka.producer.sender",
        logging.WARNING,
        "Cannot send %r to %s: %r",
        ("ProduceRequest_v7", 1, "NodeNotReadyError('node 1 not ready')"),
    ),
    (
        "aiokafka.producer.sender",
        logging.WARNING,
        "Got error produce response: %s",
        ("RequestTimedOutError",),
    ),
]

#: Faust's fetch-stall lines (its consumer thread, through mode's service logger).
STALL_LINES = [
    ("faust.transport.drivers.aiokafka", "Aiokafka stopped fetching from %r (last done %s)"),
    (
        "faust.transport.drivers.aiokafka",
        "Aiokafka has not sent fetch request for %r since start (started %s)",
    ),
    (
        "faust.transport.drivers.aiokafka",
        "Broker stopped responding to fetch requests for %r (last responded %s)",
    ),
]


def client_logger(module: str) -> logging.Logger:
    """The logger ``module`` really logs through (aiokafka's client logs as ``aiokafka``)."""
    mod = importlib.import_module(module)
    found = getattr(mod, "log", None) or getattr(mod, "logger", None)
    assert isinstance(found, logging.Logger), module
    return found


class Sink(logging.Handler):
    """What a log file would receive: every record the handler's filters let through."""

    def __init__(self, health: BrokerHealth) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.addFilter(KafkaNoiseFilter(health))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.name} {record.getMessage()}")


@pytest.fixture
def sink(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Sink, BrokerHealth, Clock]]:
    """A root handler with the noise filter, as ``install_noise_filter`` puts it."""
    clock = Clock()
    health = BrokerHealth("agents worker w", clock=clock)
    handler = Sink(health)
    root = logging.getLogger()
    monkeypatch.setattr(root, "level", logging.INFO)
    root.addHandler(handler)
    try:
        yield handler, health, clock
    finally:
        root.removeHandler(handler)


def strings_in(module: str) -> set[str]:
    """Every string literal of ``module``'s source (adjacent literals joined, as Python
    joins them)."""
    tree = ast.parse(inspect.getsource(importlib.import_module(module)))
    return {
        n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
    }


def test_the_table_is_the_installed_libraries() -> None:
    for module, _, template, _ in OUTAGE_LINES:
        assert template in strings_in(module), f"{module} no longer logs {template!r}"
    for module, template in STALL_LINES:
        assert any(template in s for s in strings_in(module)), f"{module}: {template!r}"


def test_an_outage_burst_is_one_line_down_summaries_with_counts_and_one_line_back(
    sink: tuple[Sink, BrokerHealth, Clock],
) -> None:
    handler, health, clock = sink
    # 37 s of outage at ~200 client lines a second: the 7,513 ERROR lines.
    health.failed("KafkaError: Unable to get cluster metadata over all known brokers")
    sent = 0
    for _second in range(75):
        for module, level, template, args in OUTAGE_LINES * 6:
            client_logger(module).log(level, template, *args)
            sent += 1
        clock.now += 1
        health.summarize()
    health.ok()
    assert [line.split(":", 1)[1] for line in handler.lines] == [
        " Kafka unreachable (KafkaError: Unable to get cluster metadata over all known "
        "brokers); retrying with backoff, one line when it is back",
        f" Kafka still unreachable after 60 s (1 failed attempts, {60 * 6 * len(OUTAGE_LINES)} "
        "client errors folded; last: Got error produce response: RequestTimedOutError)",
        f" Kafka back after 75.0 s (1 failed attempts, {sent} client errors folded)",
    ]


def test_faust_fetch_stalls_are_folded_only_while_the_broker_is_away(
    sink: tuple[Sink, BrokerHealth, Clock],
) -> None:
    handler, health, _ = sink

    class AIOKafkaConsumerThread(mode.Service):
        """Logs as Faust's consumer thread does: mode's service logger, Faust's module."""

    # After the class exists: mode gives a subclass its own module's logger.
    AIOKafkaConsumerThread.logger = client_logger("faust.transport.drivers.aiokafka")
    thread = AIOKafkaConsumerThread()

    def stalls() -> None:
        for _, template in STALL_LINES:
            thread.log.error(template, "TP(topic='f', partition=0)", "5 minutes ago")

    stalls()  # reachable: a real stall of the agent, said in full
    assert len(handler.lines) == 3
    assert "[^AIOKafkaConsumerThread]: Aiokafka stopped fetching" in handler.lines[0]
    health.failed("refused")
    stalls()
    assert (len(handler.lines), health.folded) == (4, 3)


async def test_real_client_connection_errors_are_folded(
    sink: tuple[Sink, BrokerHealth, Clock],
) -> None:
    """aiokafka itself, against a port that refuses and one that accepts and never
    answers (a paused broker): what it logs never reaches the file."""
    handler, health, _ = sink
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import KafkaConnectionError

    paused = socket.socket()
    paused.bind(("127.0.0.1", 0))
    paused.listen(8)
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))
    refused_port = refused.getsockname()[1]
    refused.close()
    try:
        for port in (refused_port, paused.getsockname()[1]):
            producer = AIOKafkaProducer(
                bootstrap_servers=f"127.0.0.1:{port}", request_timeout_ms=200
            )
            with pytest.raises(KafkaConnectionError):
                await asyncio.wait_for(producer.start(), 10)
            await producer.stop()
    finally:
        paused.close()
    assert handler.lines == []
    assert health.folded >= 2
