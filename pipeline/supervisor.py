"""``fedex up``: the cloud side as supervised child processes.

Starts the local broker (unless ``FEDEX_KAFKA_BOOTSTRAP`` is set), ensures the topics and
runs the aggregation worker, the trainer(s) and the model server as children with their
logs in one directory. A child that dies is reported and restarted with exponential
backoff; Ctrl-C stops everything (SIGTERM, a grace period, then SIGKILL). Children die
with the supervisor even if it is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.lifecycle import Service, stop_on_signals
from pipeline.processes import die_with_parent
from pipeline.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ChildSpec:
    name: str
    argv: tuple[str, ...]


@dataclass(slots=True)
class Backoff:
    """Restart delay: doubles per quick death, back to ``initial`` after a long healthy run."""

    initial: float = 1.0
    factor: float = 2.0
    maximum: float = 30.0
    healthy_after: float = 60.0
    current: float = field(init=False)

    def __post_init__(self) -> None:
        self.current = self.initial

    def next_delay(self, ran_for: float) -> float:
        if ran_for >= self.healthy_after:
            self.current = self.initial
        delay = self.current
        self.current = min(self.maximum, self.current * self.factor)
        return delay


@dataclass(slots=True)
class ChildState:
    spec: ChildSpec
    log_path: Path
    backoff: Backoff
    process: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    restarts: int = 0
    last_exit: int | None = None


def fedex_argv(*args: str) -> tuple[str, ...]:
    """The command line of a ``fedex`` sub-command run by this interpreter."""
    return (sys.executable, "-m", "pipeline", *args)


def cloud_children(*, trainers: Sequence[str]) -> list[ChildSpec]:
    """Worker, one trainer per device in ``trainers``, and the model server."""
    children = [ChildSpec("worker", fedex_argv("worker"))]
    for i, device in enumerate(trainers):
        children.append(ChildSpec(f"trainer-{i}", fedex_argv("trainer", "--device", device)))
    children.append(ChildSpec("server", fedex_argv("serve")))
    return children


Event = Callable[[str], None]


class Supervisor(Service):
    """Runs children, restarts the ones that die, stops them all on ``stop()``."""

    def __init__(
        self,
        children: Sequence[ChildSpec],
        *,
        log_dir: Path,
        env: dict[str, str],
        grace: float = 15.0,
        on_event: Event | None = None,
        backoff: Callable[[], Backoff] = Backoff,
    ) -> None:
        self._states = [ChildState(c, log_dir / f"{c.name}.log", backoff()) for c in children]
        self._log_dir = log_dir
        self._env = env
        self._grace = grace
        self._on_event = on_event or (lambda message: log.info("%s", message))
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    @property
    def children(self) -> list[ChildState]:
        return list(self._states)

    async def start(self) -> None:
        if self._tasks:
            return
        self._log_dir.mkdir(parents=True, exist_ok=True)
        for state in self._states:
            await self._spawn(state)
            self._tasks.append(
                asyncio.create_task(self._watch(state), name=f"watch-{state.spec.name}")
            )

    async def _spawn(self, state: ChildState) -> None:
        with state.log_path.open("ab") as log_file:
            state.process = await asyncio.create_subprocess_exec(
                *state.spec.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                env=self._env,
                preexec_fn=die_with_parent(os.getpid()),
            )
        state.started_at = time.monotonic()
        self._on_event(f"{state.spec.name} started (pid {state.process.pid}, log {state.log_path})")

    async def _watch(self, state: ChildState) -> None:
        while not self._stopping:
            assert state.process is not None
            code = await state.process.wait()
            if self._stopping:
                return
            state.last_exit = code
            ran_for = time.monotonic() - state.started_at
            delay = state.backoff.next_delay(ran_for)
            self._on_event(
                f"{state.spec.name} exited with code {code} after {ran_for:.1f} s; "
                f"restarting in {delay:.0f} s (see {state.log_path})"
            )
            await asyncio.sleep(delay)
            if self._stopping:
                return
            state.restarts += 1
            await self._spawn(state)

    async def stop(self) -> None:
        """SIGTERM every child, wait ``grace`` seconds, SIGKILL the rest. Idempotent."""
        if self._stopping:
            return
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        running = [s.process for s in self._states if s.process and s.process.returncode is None]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        waits = [asyncio.ensure_future(proc.wait()) for proc in running]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=self._grace)
            for proc in running:
                if proc.returncode is None:
                    self._on_event(
                        f"pid {proc.pid} ignored SIGTERM for {self._grace:.0f} s: SIGKILL"
                    )
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            if pending:
                await asyncio.wait(pending, timeout=5)
        self._on_event("all children stopped")


def child_env(settings: Settings, bootstrap: str) -> dict[str, str]:
    """The children's environment: ours, pinned to the cluster and home actually in use."""
    env = dict(os.environ)
    env["FEDEX_KAFKA_BOOTSTRAP"] = bootstrap
    env["FEDEX_HOME"] = str(settings.home.resolve())
    env["FEDEX_TOPIC_PREFIX"] = settings.topic_prefix
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


async def run_up(
    settings: Settings,
    *,
    trainers: Sequence[str],
    max_runtime: float | None = None,
    on_event: Event | None = None,
) -> None:
    """Runs the cloud stack until SIGINT/SIGTERM (or ``max_runtime``)."""

    stop = asyncio.Event()
    with stop_on_signals(stop.set):
        await _run_stack(settings, trainers, max_runtime, on_event, stop)


async def _run_stack(
    settings: Settings,
    trainers: Sequence[str],
    max_runtime: float | None,
    on_event: Event | None,
    stop: asyncio.Event,
) -> None:
    from pipeline.stack import stack_for

    async with stack_for(settings) as live:
        assert live.kafka_bootstrap is not None
        emit = on_event or (lambda message: log.info("%s", message))
        emit(f"Kafka at {live.kafka_bootstrap}; topics ensured with prefix {live.topic_prefix!r}")
        supervisor = Supervisor(
            cloud_children(trainers=trainers),
            log_dir=settings.log_dir,
            env=child_env(settings, live.kafka_bootstrap),
            on_event=emit,
        )
        async with supervisor:
            emit(f"model server: {settings.server_url}; Ctrl-C stops everything")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max_runtime)
            emit("stopping…")
