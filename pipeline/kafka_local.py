"""A real Apache Kafka broker (KRaft, single node) run from Maven Central jars, no Docker.

What this module owns (the jar cache is :mod:`pipeline.kafka_jars`, the detached broker of
``fedex kafka start`` is :mod:`pipeline.kafka_daemon`):

- the broker's files: ``server.properties``, the log, the data dir (formatted once);
- the JVM's lifetime. A broker *owned* by a Python process (tests, ``fedex up``) dies with
  it: its own process group (Ctrl-C in a terminal reaches Python, which stops it in order),
  ``PR_SET_PDEATHSIG`` (SIGTERM when the parent dies, even by SIGKILL) and an ``atexit``
  hook. A *detached* broker (``fedex kafka start``) outlives the command and is found
  again through its pidfile.

The pure helpers (properties and command lines in :mod:`pipeline.kafka_config`, pidfile
records here) are separate from the I/O so they can be unit-tested without Java.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import psutil

from pipeline.errors import KafkaUnavailableError
from pipeline.kafka_config import (
    DEFAULT_MESSAGE_MAX_BYTES,
    MAIN_CLASS,
    MIB,
    broker_properties,
    java_command,
    new_cluster_id,
    render_properties,
    storage_format_command,
)
from pipeline.kafka_jars import KAFKA_DIR, POM_PATH, ensure_jars, find_java, kafka_version
from pipeline.lifecycle import Service
from pipeline.processes import die_with_parent, terminate_pid

log = logging.getLogger(__name__)

LOG4J2_PATH = KAFKA_DIR / "log4j2.properties"

#: The broker prints this once every listener accepts requests.
READY_LINE = "Kafka Server started"
LOG_TAIL_LINES = 30
#: A daemon's log is appended to across restarts; past this size it moves to broker.log.1.
LOG_ROTATE_BYTES = 50 * MIB


# --------------------------------------------------------------------------- pure helpers


def read_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a text file ('' if it does not exist)."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 256 * 1024))
            data = fh.read()
    except FileNotFoundError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def rotate_log(path: Path, max_bytes: int = LOG_ROTATE_BYTES) -> bool:
    """Move ``path`` to ``path.1`` (replacing it) when larger than ``max_bytes``."""
    try:
        if path.stat().st_size <= max_bytes:
            return False
    except FileNotFoundError:
        return False
    path.replace(path.with_name(path.name + ".1"))
    return True


# Ports free_port has handed out in this process. The OS may give a released port back on
# the next bind to 0, so a caller that picks a broker, a controller and a server port before
# binding any of them could get one port twice (a broker and its controller on one port
# fails at start).
_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS considers free right now (bind to 0, read it back, release it), never
    one this process was handed before."""
    for _ in range(256):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise OSError(f"no free port on {host} that this process has not already handed out")


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Same as the JVM's listener: a TIME_WAIT leftover does not make the port busy.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def split_bootstrap(bootstrap: str) -> tuple[str, int]:
    """Host and port of the first server of a bootstrap string (default port 9092)."""
    first = bootstrap.split(",")[0].strip()
    host, sep, port = first.rpartition(":")
    if not sep:
        return first, 9092
    return host.strip("[]"), int(port)


# --------------------------------------------------------------------------- pidfile


@dataclass(frozen=True, slots=True)
class BrokerRecord:
    """What the pidfile of a detached broker remembers about it."""

    pid: int
    port: int
    controller_port: int
    bootstrap: str
    work_dir: str
    data_dir: str
    server_properties: str
    log: str
    version: str
    started_at: float

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> BrokerRecord:
        raw = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


def write_pidfile(path: Path, record: BrokerRecord) -> None:
    """Write atomically: a concurrent reader sees the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(record.to_json() + "\n")
    tmp.replace(path)


def read_pidfile(path: Path) -> BrokerRecord | None:
    """The record, or None when there is no pidfile or it is unreadable (a crash mid-write of
    an older version, a hand edit): such a file says nothing about a running broker."""
    try:
        return BrokerRecord.from_json(path.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as exc:
        log.warning("ignoring unreadable pidfile %s: %s", path, exc)
        return None


def is_broker_process(pid: int, server_properties: str | Path) -> bool:
    """True if ``pid`` is alive and is *our* broker: a java process running ``kafka.Kafka``
    with that properties file. Guards against a stale pidfile whose pid was reused."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        cmdline = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return MAIN_CLASS in cmdline and str(server_properties) in cmdline


def find_broker_processes(work_dir: Path) -> list[int]:
    """Pids of live brokers whose properties file lies in ``work_dir`` (orphans included)."""
    prefix = str(work_dir).rstrip(os.sep) + os.sep
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        cmdline = proc.info.get("cmdline") or []
        if proc.info.get("status") == psutil.STATUS_ZOMBIE or MAIN_CLASS not in cmdline:
            continue
        if any(arg.startswith(prefix) for arg in cmdline[1:]):
            found.append(int(proc.info["pid"]))
    return found


# --------------------------------------------------------------------------- storage


def format_storage(
    *, java: str, libs_dir: Path, data_dir: Path, server_properties: Path, timeout: float = 120
) -> bool:
    """Format ``data_dir`` for KRaft unless it already is. Blocking. True if it formatted."""
    if (data_dir / "meta.properties").exists():
        return False
    data_dir.mkdir(parents=True, exist_ok=True)
    cmd = storage_format_command(
        java=java,
        libs_dir=libs_dir,
        cluster_id=new_cluster_id(),
        server_properties=server_properties,
    )
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise KafkaUnavailableError(
            f"formatting Kafka storage in {data_dir} took more than {timeout:.0f} s"
        ) from exc
    if result.returncode != 0:
        output = "\n".join((result.stdout + result.stderr).splitlines()[-LOG_TAIL_LINES:])
        raise KafkaUnavailableError(
            f"formatting Kafka storage in {data_dir} failed (exit {result.returncode}); if the "
            f"directory holds data of another broker, delete it.\n--- output ---\n{output}"
        )
    return True


# --------------------------------------------------------------------------- owned processes

_OWNED: dict[int, subprocess.Popen[bytes]] = {}
_ATEXIT_REGISTERED = False


def _kill_owned_at_exit() -> None:
    for pid, proc in list(_OWNED.items()):
        if proc.poll() is None:
            log.warning("stopping Kafka broker pid %d left running at interpreter exit", pid)
            terminate_pid(pid, timeout=10, group=True)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1)
        _OWNED.pop(pid, None)


# --------------------------------------------------------------------------- the component


class _Under:
    """A file or folder of a broker's, by its name under the broker's root."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, paths: KafkaPaths, owner: type[KafkaPaths] | None = None) -> Path:
        return paths.root / self.name


@dataclass(frozen=True, slots=True)
class KafkaPaths:
    """Where a broker keeps its files. The CLI daemon uses ``<home>/kafka``."""

    root: Path

    @classmethod
    def under(cls, home: Path) -> KafkaPaths:
        return cls(home / "kafka")

    libs = _Under("libs")
    data = _Under("data")
    server_properties = _Under("server.properties")
    log4j = _Under("log4j2.properties")
    log = _Under("broker.log")
    pidfile = _Under("broker.pid")


class LocalKafka(Service):
    """One local single-node Kafka broker: ``async start()``, idempotent ``async stop()``,
    ``async with``.

    ``work_dir`` holds server.properties, the log (``broker.log``) and by default the data
    (``data/``); ``libs_dir`` is the jar cache (default ``<work_dir>/libs``) and may be
    shared by many brokers. With ``detached=True`` the JVM outlives this process (its own
    session, no death signal) and ``pidfile`` lets a later process find and stop it.
    """

    def __init__(
        self,
        *,
        work_dir: Path,
        port: int,
        libs_dir: Path | None = None,
        data_dir: Path | None = None,
        controller_port: int | None = None,
        host: str = "127.0.0.1",
        heap: str = "512m",
        message_max_bytes: int = DEFAULT_MESSAGE_MAX_BYTES,
        extra_properties: Mapping[str, str] | None = None,
        start_timeout: float = 90.0,
        stop_timeout: float = 30.0,
        detached: bool = False,
        pidfile: Path | None = None,
        java: str | None = None,
        mvn: str | None = None,
        pom: Path = POM_PATH,
    ) -> None:
        self.paths = KafkaPaths(work_dir.resolve())
        self.libs_dir = (libs_dir or self.paths.libs).resolve()
        self.data_dir = (data_dir or self.paths.data).resolve()
        self.host = host
        self.port = port
        self._controller_port = controller_port
        self.heap = heap
        self.message_max_bytes = message_max_bytes
        self.extra_properties = dict(extra_properties or {})
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.detached = detached
        self.pidfile = pidfile
        self._java = java
        self._mvn = mvn
        self._pom = pom
        self._proc: subprocess.Popen[bytes] | None = None
        self._record: BrokerRecord | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def log_path(self) -> Path:
        return self.paths.log

    @property
    def record(self) -> BrokerRecord | None:
        """What the pidfile holds about the running broker (None before start)."""
        return self._record

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return read_tail(self.log_path, lines)

    async def start(self) -> None:
        """Fetch jars if needed, format storage if new, start the JVM, return when it serves.

        Raises KafkaUnavailableError (with the broker log's tail) when Java or the jars are
        missing, a port is taken, the JVM exits, or it is not ready within ``start_timeout``.
        """
        if self._proc is not None:
            return
        java = find_java(self._java)
        libs = await ensure_jars(self.libs_dir, pom=self._pom, mvn=self._mvn)
        controller_port = self._controller_port or free_port(self.host)
        while controller_port == self.port:  # a fixed broker port the OS may also hand out
            controller_port = free_port(self.host)
        # A restart (after stop or kill) keeps the quorum's address.
        self._controller_port = controller_port
        for what, port in (("broker", self.port), ("controller", controller_port)):
            if not port_is_free(self.host, port):
                raise KafkaUnavailableError(
                    f"cannot start the local Kafka broker: {what} port {self.host}:{port} is "
                    "already in use (another broker? `fedex kafka status`). Stop it, or pick "
                    "another port with FEDEX_KAFKA_PORT."
                )
        self.paths.root.mkdir(parents=True, exist_ok=True)
        props = broker_properties(
            port=self.port,
            controller_port=controller_port,
            data_dir=self.data_dir,
            host=self.host,
            message_max_bytes=self.message_max_bytes,
            extra=self.extra_properties,
        )
        self.paths.server_properties.write_text(render_properties(props))
        shutil.copyfile(LOG4J2_PATH, self.paths.log4j)
        await asyncio.to_thread(
            format_storage,
            java=java,
            libs_dir=libs,
            data_dir=self.data_dir,
            server_properties=self.paths.server_properties,
        )
        cmd = java_command(
            java=java,
            libs_dir=libs,
            heap=self.heap,
            log4j_config=self.paths.log4j,
            server_properties=self.paths.server_properties,
        )
        rotate_log(self.log_path)
        with self.log_path.open("ab") as log_fh:
            log_offset = log_fh.tell()
            header = f"\n==== fedex: starting Kafka broker at {time.strftime('%F %T')} ====\n"
            log_fh.write(header.encode())
            log_fh.flush()
            log.info("starting Kafka broker on %s (log %s)", self.bootstrap, self.log_path)
            self._proc = self._spawn(cmd, log_fh)
        self._record = BrokerRecord(
            pid=self._proc.pid,
            port=self.port,
            controller_port=controller_port,
            bootstrap=self.bootstrap,
            work_dir=str(self.paths.root),
            data_dir=str(self.data_dir),
            server_properties=str(self.paths.server_properties),
            log=str(self.log_path),
            version=kafka_version(self._pom.read_text()),
            started_at=time.time(),
        )
        if self.pidfile is not None:
            write_pidfile(self.pidfile, self._record)
        try:
            await self._wait_ready(log_offset)
        except BaseException:
            # Includes cancellation (Ctrl-C during start): never leave a half-started JVM.
            await asyncio.shield(self.stop())
            raise

    def _spawn(self, cmd: list[str], log_fh: IO[bytes]) -> subprocess.Popen[bytes]:
        global _ATEXIT_REGISTERED
        if self.detached:
            return subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log_fh,
                stderr=subprocess.STDOUT,
                cwd=self.paths.root,
                start_new_session=True,
            )
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log_fh,
            stderr=subprocess.STDOUT,
            cwd=self.paths.root,
            process_group=0,
            preexec_fn=die_with_parent(os.getpid()),
        )
        _OWNED[proc.pid] = proc
        if not _ATEXIT_REGISTERED:
            atexit.register(_kill_owned_at_exit)
            _ATEXIT_REGISTERED = True
        return proc

    async def _wait_ready(self, log_offset: int) -> None:
        assert self._proc is not None
        proc = self._proc
        deadline = time.monotonic() + self.start_timeout
        seen_line = False
        carry = ""
        with self.log_path.open("rb") as fh:
            fh.seek(log_offset)
            while True:
                if not seen_line:
                    chunk = carry + fh.read().decode("utf-8", "replace")
                    seen_line = READY_LINE in chunk
                    carry = chunk[-len(READY_LINE) :]
                # The log line says the broker thinks it is up; the open port proves it.
                if seen_line and await port_accepts(self.host, self.port):
                    log.info("Kafka broker ready on %s (pid %d)", self.bootstrap, proc.pid)
                    return
                returncode = proc.poll()
                if returncode is not None:
                    raise KafkaUnavailableError(
                        f"the local Kafka broker (pid {proc.pid}) exited with code {returncode} "
                        f"during start-up.\n{self._tail_for_error()}"
                    )
                if time.monotonic() > deadline:
                    raise KafkaUnavailableError(
                        f"the local Kafka broker (pid {proc.pid}) was not ready on "
                        f"{self.bootstrap} within {self.start_timeout:.0f} s "
                        f"(log says started: {seen_line}).\n{self._tail_for_error()}"
                    )
                await asyncio.sleep(0.1)

    def _tail_for_error(self) -> str:
        return f"--- last {LOG_TAIL_LINES} lines of {self.log_path} ---\n{self.log_tail()}"

    async def stop(self) -> None:
        """SIGTERM (controlled shutdown), wait ``stop_timeout``, then SIGKILL. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if proc.poll() is None:
                log.info("stopping Kafka broker pid %d", proc.pid)
                await asyncio.to_thread(
                    terminate_pid, proc.pid, timeout=self.stop_timeout, group=True
                )
            await asyncio.to_thread(proc.wait, 10)
        finally:
            _OWNED.pop(proc.pid, None)
            if self.pidfile is not None:
                record = read_pidfile(self.pidfile)
                if record is not None and record.pid == proc.pid:
                    self.pidfile.unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL the broker, as a crash would (chaos tests): no controlled shutdown.
        ``start()`` brings it back on the same ports and data."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        _OWNED.pop(proc.pid, None)

    def pause(self) -> None:
        """SIGSTOP the broker: it keeps its sockets but answers nothing (a hung broker)."""
        if self._proc is not None:
            os.killpg(self._proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        if self._proc is not None:
            os.killpg(self._proc.pid, signal.SIGCONT)


async def port_accepts(host: str, port: int, within: float = 1.0) -> bool:
    """True if a TCP connection to ``host:port`` opens within ``within`` seconds."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), within)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True
