"""The local broker's pure helpers, jar cache, pidfile and process handling; no Java."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pipeline import kafka_config, kafka_daemon, kafka_jars, kafka_local, processes
from pipeline.clients import wait_for_kafka
from pipeline.errors import KafkaUnavailableError
from pipeline.kafka_config import broker_properties, parse_properties, render_properties
from pipeline.kafka_local import (
    BrokerRecord,
    KafkaPaths,
    LocalKafka,
    read_pidfile,
    write_pidfile,
)


def _record(tmp_path: Path, pid: int, props: Path | None = None) -> BrokerRecord:
    return BrokerRecord(
        pid=pid,
        port=19092,
        controller_port=19093,
        bootstrap="127.0.0.1:19092",
        work_dir=str(tmp_path),
        data_dir=str(tmp_path / "data"),
        server_properties=str(props or tmp_path / "server.properties"),
        log=str(tmp_path / "broker.log"),
        version="4.0.1",
        started_at=1.5,
    )


# --------------------------------------------------------------------------- properties


def test_broker_properties_single_node_kraft_on_loopback(tmp_path: Path) -> None:
    props = broker_properties(port=19092, controller_port=19093, data_dir=tmp_path / "d")

    assert props["process.roles"] == "broker,controller"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:19093"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:19092"
    assert props["log.dirs"] == str(tmp_path / "d")
    assert props["offsets.topic.replication.factor"] == "1"
    assert props["offsets.topic.num.partitions"] == "1"
    assert props["group.initial.rebalance.delay.ms"] == "0"
    # The 8 MiB model topic must fit under the broker-wide limits.
    assert int(props["message.max.bytes"]) >= 8 * 1024 * 1024
    assert int(props["socket.request.max.bytes"]) > int(props["message.max.bytes"])


def test_broker_properties_extra_overrides_and_adds(tmp_path: Path) -> None:
    props = broker_properties(
        port=1,
        controller_port=2,
        data_dir=tmp_path,
        message_max_bytes=32 * 1024 * 1024,
        extra={"num.partitions": "3", "auto.create.topics.enable": "false"},
    )
    assert props["num.partitions"] == "3"
    assert props["auto.create.topics.enable"] == "false"
    assert props["message.max.bytes"] == str(32 * 1024 * 1024)


def test_broker_properties_rejects_shared_port(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="distinct ports"):
        broker_properties(port=9092, controller_port=9092, data_dir=tmp_path)


def test_render_parse_round_trip(tmp_path: Path) -> None:
    props = broker_properties(port=1, controller_port=2, data_dir=Path(r"C:\odd\dir"))
    text = render_properties(props)
    assert text.startswith("#")
    assert "log.dirs=C:\\\\odd\\\\dir" in text
    assert parse_properties(text) == props


def test_render_rejects_newlines() -> None:
    with pytest.raises(ValueError, match="newline"):
        render_properties({"a": "x\ny=z"})


def test_cluster_id_is_22_char_urlsafe_uuid() -> None:
    ids = {kafka_config.new_cluster_id() for _ in range(200)}
    assert len(ids) == 200
    for cid in ids:
        assert len(cid) == 22
        assert not cid.startswith("-")
        assert len(base64.urlsafe_b64decode(cid + "==")) == 16


def test_kafka_version_from_the_shipped_pom() -> None:
    assert kafka_jars.kafka_version(kafka_jars.POM_PATH.read_text()) == "4.0.1"
    assert kafka_jars.kafka_version("<project/>") == "unknown"


def test_java_command_ends_with_properties_file(tmp_path: Path) -> None:
    cmd = kafka_config.java_command(
        java="/usr/bin/java",
        libs_dir=tmp_path / "libs",
        heap="256m",
        log4j_config=tmp_path / "log4j2.properties",
        server_properties=tmp_path / "server.properties",
    )
    assert cmd[0] == "/usr/bin/java"
    assert "-Xmx256m" in cmd
    assert "-Xms256m" in cmd
    assert cmd[cmd.index("-cp") + 1] == f"{tmp_path / 'libs'}/*"
    assert cmd[-2:] == ["kafka.Kafka", str(tmp_path / "server.properties")]


def test_log4j_template_ships_with_the_package() -> None:
    text = kafka_local.LOG4J2_PATH.read_text()
    assert "rootLogger.level=INFO" in text


def test_read_tail(tmp_path: Path) -> None:
    log = tmp_path / "broker.log"
    assert kafka_local.read_tail(log) == ""
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    assert kafka_local.read_tail(log, 3) == "line 97\nline 98\nline 99"


def test_rotate_log(tmp_path: Path) -> None:
    log = tmp_path / "broker.log"
    assert not kafka_local.rotate_log(log, max_bytes=10)
    log.write_text("short")
    assert not kafka_local.rotate_log(log, max_bytes=10)
    log.write_text("x" * 11)
    assert kafka_local.rotate_log(log, max_bytes=10)
    assert not log.exists()
    assert (tmp_path / "broker.log.1").read_text() == "x" * 11


def test_split_bootstrap() -> None:
    assert kafka_local.split_bootstrap("127.0.0.1:19092") == ("127.0.0.1", 19092)
    assert kafka_local.split_bootstrap("a:1,b:2") == ("a", 1)
    assert kafka_local.split_bootstrap("kafka") == ("kafka", 9092)


def test_port_is_free_sees_a_listener() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert not kafka_local.port_is_free("127.0.0.1", port)
    assert kafka_local.port_is_free("127.0.0.1", kafka_local.free_port())


def test_free_port_never_hands_out_one_port_twice() -> None:
    # Picked before any is bound (a broker, its controller, a server): all distinct.
    ports = [kafka_local.free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)


# --------------------------------------------------------------------------- pidfile and processes


@contextmanager
def ready_child(setup: str, *args: str) -> Iterator[subprocess.Popen[str]]:
    """A Python process in its own session that runs ``setup``, says it is ready and then
    blocks on stdin, with ``args`` on its command line; killed on the way out if alive."""
    code = f"import sys; {setup}; print('ready', flush=True); sys.stdin.read()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


@pytest.fixture
def fake_broker(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """A process whose command line looks like our broker's (kafka.Kafka + properties path):
    a Python process blocked on stdin."""
    props = tmp_path / "kafka" / "server.properties"
    props.parent.mkdir(parents=True)
    with ready_child("pass", "kafka.Kafka", str(props)) as proc:
        yield proc, props


def test_pidfile_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "kafka" / "broker.pid"
    record = _record(tmp_path, 1234)
    write_pidfile(path, record)
    assert read_pidfile(path) == record
    assert list(path.parent.iterdir()) == [path]  # no temp file left behind


def test_read_pidfile_missing_or_garbage_is_none(tmp_path: Path) -> None:
    path = tmp_path / "broker.pid"
    assert read_pidfile(path) is None
    path.write_text("{not json")
    assert read_pidfile(path) is None
    path.write_text('{"pid": 1}')  # fields missing
    assert read_pidfile(path) is None


def test_stale_pidfile_of_a_dead_process_is_removed(tmp_path: Path) -> None:
    paths = KafkaPaths.under(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    write_pidfile(paths.pidfile, _record(tmp_path, proc.pid, paths.server_properties))

    assert kafka_daemon.running_daemon(paths) is None
    assert not paths.pidfile.exists()


def test_pidfile_pointing_at_another_process_is_not_ours(tmp_path: Path) -> None:
    paths = KafkaPaths.under(tmp_path)
    # A live process, but not a java kafka.Kafka with our properties: a reused pid.
    write_pidfile(paths.pidfile, _record(tmp_path, os.getpid(), paths.server_properties))

    assert not kafka_local.is_broker_process(os.getpid(), paths.server_properties)
    assert kafka_daemon.running_daemon(paths) is None
    assert not paths.pidfile.exists()


async def test_stop_daemon_terminates_our_process_and_removes_pidfile(
    tmp_path: Path, fake_broker: tuple[subprocess.Popen[str], Path]
) -> None:
    proc, props = fake_broker
    paths = KafkaPaths.under(tmp_path)
    assert props == paths.server_properties
    write_pidfile(paths.pidfile, _record(tmp_path, proc.pid, props))
    assert kafka_daemon.running_daemon(paths) == read_pidfile(paths.pidfile)
    assert kafka_local.find_broker_processes(paths.root) == [proc.pid]

    stopped = await kafka_daemon.stop_daemon(home=tmp_path, grace=10)

    assert stopped is not None
    assert stopped.pid == proc.pid
    assert proc.wait(timeout=10) != 0
    assert not paths.pidfile.exists()
    assert await kafka_daemon.stop_daemon(home=tmp_path) is None


def test_terminate_escalates_to_sigkill() -> None:
    with ready_child("import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)") as stubborn:
        started = time.monotonic()
        assert processes.terminate_pid(stubborn.pid, timeout=0.5, group=True) is True
        assert time.monotonic() - started < 10
        assert stubborn.wait(timeout=10) == -9


def test_zombie_counts_as_gone() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    # Not waited for: it stays a zombie until we reap it.
    while not processes.process_gone(proc.pid):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.wait()


# --------------------------------------------------------------------------- jars, storage, start


def _fake_mvn(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "fake-mvn"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def test_fetch_jars_once_then_offline(tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    mvn = _fake_mvn(
        tmp_path,
        f"""echo call >> {calls}
for arg in "$@"; do
  case "$arg" in -DoutputDirectory=*) out="${{arg#-DoutputDirectory=}}";; esac
done
mkdir -p "$out" && touch "$out/kafka_2.13-4.0.1.jar"
""",
    )
    libs = tmp_path / "libs"

    assert kafka_jars.fetch_jars(libs, mvn=str(mvn)) == libs.resolve()
    assert (libs / "kafka_2.13-4.0.1.jar").exists()
    assert kafka_jars.jars_are_cached(libs)
    # Second time: the marker matches the pom, no mvn at all (not even a missing one).
    assert kafka_jars.fetch_jars(libs, mvn="/nonexistent/mvn") == libs.resolve()
    assert calls.read_text().count("call") == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".libs.")] == [".libs.lock"]


def test_fetch_jars_refetches_when_the_pom_changes(tmp_path: Path) -> None:
    libs = tmp_path / "libs"
    libs.mkdir()
    (libs / kafka_jars.JARS_MARKER).write_text("sha-of-an-older-pom\n")
    assert not kafka_jars.jars_are_cached(libs)


def test_fetch_jars_without_maven_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(KafkaUnavailableError, match="Maven"):
        kafka_jars.fetch_jars(tmp_path / "libs", mvn="/nonexistent/mvn")


def test_fetch_jars_failure_shows_mvn_output(tmp_path: Path) -> None:
    mvn = _fake_mvn(tmp_path, "echo 'Could not resolve dependencies: offline'\nexit 1\n")
    with pytest.raises(KafkaUnavailableError, match="Could not resolve dependencies") as info:
        kafka_jars.fetch_jars(tmp_path / "libs", mvn=str(mvn))
    assert "exit 1" in str(info.value)
    assert not (tmp_path / "libs").exists()


def test_format_storage_runs_once_per_data_dir(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "meta.properties").write_text("node.id=1\n")
    # Already formatted: java is never called.
    assert not kafka_local.format_storage(
        java="/nonexistent/java",
        libs_dir=tmp_path,
        data_dir=data,
        server_properties=tmp_path / "server.properties",
    )


def _cached_libs(tmp_path: Path) -> Path:
    libs = tmp_path / "libs"
    libs.mkdir()
    digest = kafka_jars.pom_digest(kafka_jars.POM_PATH.read_bytes())
    (libs / kafka_jars.JARS_MARKER).write_text(digest)
    return libs


async def test_start_on_a_busy_port_fails_fast_and_says_so(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        kafka = LocalKafka(
            work_dir=tmp_path / "k", libs_dir=_cached_libs(tmp_path), port=port, java="/bin/false"
        )
        with pytest.raises(KafkaUnavailableError, match=f"port 127.0.0.1:{port} is already in use"):
            await asyncio.wait_for(kafka.start(), 10)
    assert kafka.pid is None
    await kafka.stop()  # idempotent, nothing to stop


async def test_wait_for_kafka_names_the_bootstrap_on_timeout() -> None:
    bootstrap = f"127.0.0.1:{kafka_local.free_port()}"
    started = time.monotonic()
    with pytest.raises(KafkaUnavailableError, match=bootstrap):
        await wait_for_kafka(bootstrap, timeout=0.5)
    assert time.monotonic() - started < 5


def test_cli_modules_do_not_import_torch_or_faust() -> None:
    code = (
        "import sys, pipeline.cli, pipeline.kafka_local, pipeline.topics, pipeline.clients; "
        "heavy = sorted(m for m in ('torch', 'faust') if m in sys.modules); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
