"""The local broker's lifecycle with a real JVM: failures, clean stops, no orphans, the CLI.

Each test here that starts its own broker costs a few seconds; the rest of the suite shares
the session broker from conftest.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from pipeline import kafka_jars, kafka_local
from pipeline.clients import wait_for_kafka
from pipeline.errors import KafkaUnavailableError
from pipeline.kafka_local import LocalKafka, find_broker_processes, free_port
from pipeline.processes import process_gone, terminate_pid
from pipeline.settings import Settings
from pipeline.topics import topic_specs
from tests.integration.conftest import EXTERNAL_BOOTSTRAP, JAR_CACHE, TEST_HEAP

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        EXTERNAL_BOOTSTRAP is not None,
        reason="FEDEX_KAFKA_BOOTSTRAP is set: this run starts no local brokers",
    ),
]


def _wait_gone(pid: int, within: float) -> None:
    deadline = time.monotonic() + within
    while not process_gone(pid):
        assert time.monotonic() < deadline, f"pid {pid} still alive after {within} s"
        time.sleep(0.05)


async def test_session_broker_answers(kafka_bootstrap: str) -> None:
    await wait_for_kafka(kafka_bootstrap, timeout=10)
    assert kafka_jars.jars_are_cached(JAR_CACHE)


async def test_broker_that_cannot_start_raises_with_the_log_tail(tmp_path: Path) -> None:
    # Valid for the config parser (and so for the storage format), fatal at start-up.
    kafka = LocalKafka(
        work_dir=tmp_path,
        libs_dir=JAR_CACHE,
        port=free_port(),
        heap=TEST_HEAP,
        extra_properties={"authorizer.class.name": "org.example.NoSuchAuthorizer"},
        start_timeout=60,
    )
    started = time.monotonic()
    with pytest.raises(KafkaUnavailableError) as info:
        await asyncio.wait_for(kafka.start(), 90)

    message = str(info.value)
    assert "exited with code" in message
    assert f"last {kafka_local.LOG_TAIL_LINES} lines of {tmp_path / 'broker.log'}" in message
    assert "ClassNotFoundException: org.example.NoSuchAuthorizer" in message
    assert time.monotonic() - started < 90
    assert find_broker_processes(tmp_path) == []


async def test_stop_leaves_no_process_and_needs_no_maven(tmp_path: Path) -> None:
    # mvn that does not exist: the jar cache must be enough to start.
    kafka = LocalKafka(
        work_dir=tmp_path, libs_dir=JAR_CACHE, port=free_port(), heap=TEST_HEAP, mvn="/no/mvn"
    )
    async with kafka:
        await wait_for_kafka(kafka.bootstrap, timeout=10)
        pid = kafka.pid
        assert pid is not None
        assert find_broker_processes(tmp_path) == [pid]
        assert (tmp_path / "data" / "meta.properties").exists()

    assert process_gone(pid)
    assert find_broker_processes(tmp_path) == []
    assert "Kafka Server started" in kafka.log_tail(10_000)
    await kafka.stop()  # idempotent


def test_owned_broker_dies_when_its_parent_is_killed(tmp_path: Path) -> None:
    """SIGKILL of the owning Python process (no finally, no atexit) still ends the JVM."""
    script = textwrap.dedent(
        f"""
        import asyncio, json, sys
        from pathlib import Path
        from pipeline.kafka_local import LocalKafka, free_port

        async def main():
            kafka = LocalKafka(work_dir=Path({str(tmp_path)!r}), libs_dir=Path({str(JAR_CACHE)!r}),
                               port=free_port(), heap={TEST_HEAP!r})
            await kafka.start()
            print(json.dumps({{"pid": kafka.pid}}), flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

        asyncio.run(main())
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
        text=True,
    )
    jvm_pid = None
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()  # bounded by the broker's start timeout
        assert line, f"parent exited with {parent.wait()} before the broker was ready"
        jvm_pid = json.loads(line)["pid"]
        assert find_broker_processes(tmp_path) == [jvm_pid]

        parent.kill()
        parent.wait(timeout=10)

        _wait_gone(jvm_pid, within=30)
        assert find_broker_processes(tmp_path) == []
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for pid in find_broker_processes(tmp_path):
            terminate_pid(pid, timeout=5, group=False)


def _fedex(
    env: dict[str, str], *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from pipeline.cli import main; main()", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_cli_daemon_start_status_describe_stop(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "kafka").mkdir(parents=True)
    # Share the repo's jar cache instead of downloading again.
    (home / "kafka" / "libs").symlink_to(JAR_CACHE, target_is_directory=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDEX_")}
    env.update(
        FEDEX_HOME=str(home),
        FEDEX_KAFKA_PORT=str(port),
        FEDEX_KAFKA_HEAP=TEST_HEAP,
        FEDEX_TOPIC_PREFIX=f"cli-{uuid.uuid4().hex[:8]}",
        COLUMNS="250",
    )
    prefix = env["FEDEX_TOPIC_PREFIX"]
    pid = None
    try:
        start = _fedex(env, "kafka", "start")
        assert start.returncode == 0, start.stderr
        assert f"started on 127.0.0.1:{port}" in start.stdout
        record = kafka_local.read_pidfile(home / "kafka" / "broker.pid")
        assert record is not None
        pid = record.pid
        assert kafka_local.is_broker_process(pid, record.server_properties)

        again = _fedex(env, "kafka", "start")
        assert again.returncode == 0, again.stderr
        assert "already running" in again.stdout

        status = _fedex(env, "kafka", "status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert "yes" in status.stdout
        assert f"pid {pid}" in status.stdout

        ensure = _fedex(env, "topics", "ensure")
        assert ensure.returncode == 0, ensure.stderr
        specs = topic_specs(Settings(topic_prefix=prefix))
        assert f"{len(specs)} created, 0 updated, 0 unchanged" in ensure.stdout

        describe = _fedex(env, "topics", "describe")
        assert describe.returncode == 0, describe.stderr
        for spec in specs:
            assert spec.name in describe.stdout
        assert "compact" in describe.stdout

        logs = _fedex(env, "kafka", "logs", "-n", "5")
        assert logs.returncode == 0, logs.stderr
        assert len(logs.stdout.splitlines()) == 5

        stop = _fedex(env, "kafka", "stop")
        assert stop.returncode == 0, stop.stderr
        assert f"stopped Kafka broker pid {pid}" in stop.stdout
        _wait_gone(pid, within=10)
        assert find_broker_processes(home / "kafka") == []
        assert not (home / "kafka" / "broker.pid").exists()

        down = _fedex(env, "kafka", "status", "--timeout", "0.5")
        assert down.returncode == 1
        assert "no" in down.stdout
    finally:
        for stray in find_broker_processes((home / "kafka").resolve()):
            terminate_pid(stray, timeout=5, group=False)


def test_cli_with_external_bootstrap_starts_nothing(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDEX_")}
    env.update(FEDEX_HOME=str(tmp_path), FEDEX_KAFKA_BOOTSTRAP="127.0.0.1:1")
    start = _fedex(env, "kafka", "start")
    assert start.returncode == 0, start.stderr
    assert "using the cluster at 127.0.0.1:1" in start.stdout
    assert not (tmp_path / "kafka").exists()
