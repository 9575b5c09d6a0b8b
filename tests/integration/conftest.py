"""Integration tests run against one real Kafka broker per test session.

The broker is a ``LocalKafka`` on a free port with a temporary data dir; its jars come from
``<repo>/.fedex/kafka/libs`` (fetched once with Maven, then reused by every run and by CI
caches). With ``FEDEX_KAFKA_BOOTSTRAP`` set, the tests use that cluster instead and start
nothing. Every test gets its own topic prefix (and so its own topics and groups).

Fixtures for other test modules: ``kafka_bootstrap`` (str), ``local_kafka`` (the session's
LocalKafka, or None on an external cluster), ``topic_prefix``, ``settings`` (a Settings on
that cluster with that prefix) and ``kafka_topics`` (the same, with every topic ensured).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.clients import wait_for_kafka
from pipeline.kafka_local import LocalKafka, free_port
from pipeline.settings import Settings
from pipeline.topics import Topics, ensure_topics, topic_specs

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
JAR_CACHE = REPO / ".fedex" / "kafka" / "libs"
EXTERNAL_BOOTSTRAP = os.environ.get("FEDEX_KAFKA_BOOTSTRAP") or None
#: Small enough for CI machines with 2 cores and little memory.
TEST_HEAP = "256m"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Everything under tests/integration is an integration test (``-m "not integration"``
    deselects it without each module having to say so)."""
    for item in items:
        if HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def local_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka | None]:
    """The session's broker, started on first use and stopped at the end of the session."""
    if EXTERNAL_BOOTSTRAP is not None:
        asyncio.run(wait_for_kafka(EXTERNAL_BOOTSTRAP, timeout=30))
        yield None
        return
    kafka = LocalKafka(
        work_dir=tmp_path_factory.mktemp("kafka"),
        libs_dir=JAR_CACHE,
        port=free_port(),
        heap=TEST_HEAP,
        start_timeout=120,
    )
    asyncio.run(kafka.start())
    try:
        yield kafka
    finally:
        asyncio.run(kafka.stop())


@pytest.fixture(scope="session")
def kafka_bootstrap(local_kafka: LocalKafka | None) -> str:
    if local_kafka is None:
        assert EXTERNAL_BOOTSTRAP is not None
        return EXTERNAL_BOOTSTRAP
    return local_kafka.bootstrap


@pytest.fixture
def topic_prefix() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def settings(kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> Settings:
    """Settings on the test cluster with this test's own topic prefix and home dir."""
    return Settings(kafka_bootstrap=kafka_bootstrap, topic_prefix=topic_prefix, home=tmp_path)


@pytest.fixture
async def kafka_topics(settings: Settings) -> Topics:
    """This test's topics, created per spec."""
    await ensure_topics(settings.bootstrap, topic_specs(settings))
    return Topics(settings.topic_prefix)
