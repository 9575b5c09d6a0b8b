"""BrokerHealth's state and log lines, and the Kafka client noise it folds: no broker."""

from __future__ import annotations

import logging

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
