"""Chaos runs of the real stack: faults on a schedule, then ``fedex audit`` must be clean.

A :class:`ChaosRun` starts its own local broker (so that it may kill it), ensures the
topics, registers the models' base versions, and runs the cloud as supervised child
processes (``fedex worker``, ``fedex trainer``, optionally ``fedex serve``), exactly as
``fedex up`` does. Load comes from built-in pushers (devices that re-send a push until it
is acknowledged, with the same sample ids, as the fleet does) or from a ``fedex devices``
fleet child. On a schedule it kills (SIGKILL) or pauses (SIGSTOP) the broker, or kills a
child; when the load ends it lets the system settle (every pending sample triggered,
every job answered) and audits the topics (:mod:`pipeline.audit`).

Used by the integration suite (a short run) and ``fedex bench chaos`` (the long ones).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lab.feature_pushes import feature_push
from pipeline import codec
from pipeline.audit import AuditReport
from pipeline.audit_log import audit_deployment
from pipeline.kafka_local import LocalKafka, free_port
from pipeline.processes import die_with_parent
from pipeline.records import Backbone, Cut, FeaturePush
from pipeline.settings import Settings
from pipeline.supervisor import ChildSpec, Supervisor, child_env, fedex_argv
from pipeline.topics import ensure_topics, topic_specs

log = logging.getLogger(__name__)


class FaultKind(enum.StrEnum):
    KILL_BROKER = "kill_broker"  # SIGKILL, restarted after the duration
    PAUSE_BROKER = "pause_broker"  # SIGSTOP, SIGCONT after the duration
    KILL_WORKER = "kill_worker"  # SIGKILL; the supervisor restarts it
    KILL_TRAINER = "kill_trainer"


@dataclass(frozen=True, slots=True)
class Fault:
    kind: FaultKind
    at_s: float
    duration_s: float = 0.0


@dataclass(frozen=True, slots=True)
class ChaosConfig:
    """One run. ``settings`` are the cloud's (policy, partitions…); its ``home`` holds the
    broker, logs and state; its bootstrap is replaced by the run's own broker."""

    models: int = 4
    devices_per_model: int = 5
    push_rate: float = 25.0  # pushes per second, all models together (built-in pushers)
    push_samples: int = 10
    duration_s: float = 150.0
    faults: tuple[Fault, ...] = ()
    fleet_devices: int = 0  # > 0: a `fedex devices` child instead of the built-in pushers
    serve: bool = False
    settle_timeout_s: float = 120.0
    backbone: Backbone = Backbone.MOBILENET_V2
    num_classes: int = 10
    libs_dir: Path | None = None
    kafka_heap: str = "384m"
    server_port: int = 0  # with ``serve``: 0 = any free port


@dataclass(slots=True)
class ChaosResult:
    report: AuditReport
    audit_seconds: float
    settled: bool
    settle_seconds: float
    pushes_acked: int = 0
    samples_acked: int = 0
    push_retries: int = 0
    faults: list[dict[str, Any]] = field(default_factory=list)
    restarts: dict[str, int] = field(default_factory=dict)
    wall_seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "clean": self.report.clean,
            "settled": self.settled,
            "settle_seconds": round(self.settle_seconds, 2),
            "audit_seconds": round(self.audit_seconds, 3),
            "pushes_acked": self.pushes_acked,
            "samples_acked": self.samples_acked,
            "push_retries": self.push_retries,
            "faults": self.faults,
            "restarts": self.restarts,
            "wall_seconds": round(self.wall_seconds, 1),
            "audit": self.report.to_json(),
        }


def model_ids(count: int) -> list[str]:
    return [f"faces-{i + 1}" for i in range(count)]


def settings_env(settings: Settings) -> dict[str, str]:
    """``settings`` as the ``FEDEX_*`` variables a child process reads them from."""
    env = {}
    for name, value in settings.model_dump().items():
        if value is None or name in {"home", "kafka_bootstrap", "topic_prefix"}:
            continue
        env[f"FEDEX_{name.upper()}"] = str(value)
    return env


def racing_settings(
    settings: Settings, *, min_samples: int, job_timeout_s: float, **more: Any
) -> Settings:
    """``settings`` for a chaos run: two partitions per topic, an age trigger every 2 s
    (agents tick every 0.5 s) and one epoch per job, so triggers, jobs and updates
    interleave with every push and every fault. A high ``min_samples`` leaves the age
    triggers alone; ``more`` sets any other field."""
    return settings.model_copy(
        update={
            "features_partitions": 2,
            "models_partitions": 2,
            "triggers_partitions": 2,
            "min_samples": min_samples,
            "age_floor_samples": 1,
            "max_age_s": 2.0,
            "agent_tick_s": 0.5,
            "job_timeout_s": job_timeout_s,
            "train_epochs": 1,
            **more,
        }
    )


def random_push(
    model_id: str,
    device_id: str,
    first_id: int,
    n: int,
    *,
    backbone: Backbone,
    num_classes: int,
    seed: int,
    timestamp_ms: int,
) -> FeaturePush:
    """A push of ``n`` samples with ids from ``first_id``, every label time
    ``timestamp_ms``, and random labels (below ``num_classes``) and 512-d float16 features
    at FREEZE6 drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n, dtype=np.int32)
    return feature_push(
        model_id,
        device_id,
        backbone=backbone,
        cut=Cut.FREEZE6,
        sample_ids=np.arange(first_id, first_id + n),
        labels=labels,
        features=rng.standard_normal((n, 512), dtype=np.float32),
        timestamp_ms=timestamp_ms,
    )


class Pushers:
    """Devices that push ``push_samples`` samples at a steady total rate and re-send a push,
    same sample ids, until the broker acknowledges it (at-least-once, like the fleet)."""

    def __init__(self, settings: Settings, config: ChaosConfig, models: Sequence[str]) -> None:
        from pipeline.clients import make_producer

        self._config = config
        self._models = list(models)
        self._topic = settings.topic_prefix + ".features"
        self._producer = make_producer(
            bootstrap=settings.bootstrap, client_id="chaos-devices", request_timeout_ms=5_000
        )
        self.acked = 0
        self.samples = 0
        self.retries = 0

    def _push(self, model_id: str, device: int, first_id: int) -> FeaturePush:
        return random_push(
            model_id,
            f"{model_id}-dev-{device:03d}",
            first_id,
            self._config.push_samples,
            backbone=self._config.backbone,
            num_classes=self._config.num_classes,
            seed=first_id * 1_000 + device,
            timestamp_ms=int(time.time() * 1000),
        )

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def run(self, until: float) -> None:
        """Push until ``time.monotonic() >= until``; one task per device."""
        devices = [(m, d) for m in self._models for d in range(self._config.devices_per_model)]
        interval = len(devices) / self._config.push_rate
        await asyncio.gather(
            *(self._device(m, d, interval, until, i) for i, (m, d) in enumerate(devices))
        )

    async def warm_up(self) -> None:
        """One acknowledged push per model from a device of its own."""
        for model_id in self._models:
            await self._send(self._push(model_id, WARM_UP_DEVICE, 0))

    async def _send(self, push: FeaturePush) -> None:
        """Until acknowledged (same bytes, same sample ids), then count it."""
        value, key = codec.encode_push(push), codec.encode_key(push.model_id)
        while True:
            try:
                await self._producer.send_and_wait(self._topic, value, key=key)
                break
            except Exception as exc:
                self.retries += 1
                log.debug("push of %s retried: %s", push.device_id, exc)
                await asyncio.sleep(0.5)
        self.acked += 1
        self.samples += push.n

    async def _device(
        self, model_id: str, device: int, interval: float, until: float, index: int
    ) -> None:
        await asyncio.sleep(interval * index / max(1, self._config.push_rate * interval))
        next_id = 0
        while time.monotonic() < until:
            await self._send(self._push(model_id, device, next_id))
            next_id += self._config.push_samples
            await asyncio.sleep(interval)


#: The device index of the warm-up pushes (apart from the load's devices).
WARM_UP_DEVICE = 999


class ChaosRun:
    """One chaos run (see the module docstring). ``on_event`` gets progress lines;
    ``on_settled`` is awaited with the result while the stack still runs (to inspect it)."""

    def __init__(
        self,
        settings: Settings,
        config: ChaosConfig,
        *,
        on_event: Callable[[str], None] | None = None,
        on_settled: Callable[[ChaosResult], Awaitable[None]] | None = None,
    ) -> None:
        self.config = config
        self._on_settled = on_settled
        self.home = settings.home.resolve()
        self._on_event = on_event or (lambda message: log.info("%s", message))
        self.kafka = LocalKafka(
            work_dir=self.home / "chaos-kafka",
            libs_dir=config.libs_dir,
            port=free_port(),
            heap=config.kafka_heap,
            start_timeout=120,
        )
        # Its own ports too: a run must not collide with a stack already on this machine.
        self.settings = settings.model_copy(
            update={
                "kafka_bootstrap": self.kafka.bootstrap,
                "home": self.home,
                "worker_port": free_port(),
            }
        )
        self.log_dir = self.home / "chaos-logs" / settings.topic_prefix
        self._faults: list[dict[str, Any]] = []
        self._started = time.monotonic()

    def _emit(self, message: str) -> None:
        self._on_event(f"[{time.monotonic() - self._started:6.1f} s] {message}")

    def _children(self) -> list[ChildSpec]:
        children = [
            ChildSpec("worker", fedex_argv("worker")),
            ChildSpec("trainer", fedex_argv("trainer", "--device", "cpu")),
        ]
        if self.config.serve:
            port = str(self.config.server_port)
            children.append(ChildSpec("server", fedex_argv("serve", "--port", port)))
        return children

    async def run(self) -> ChaosResult:
        from pipeline.publishing import register_model

        self._started = time.monotonic()
        cfg = self.config
        # A fresh broker per run: the run may kill it, and audits only its own topics.
        shutil.rmtree(self.kafka.data_dir, ignore_errors=True)
        await self.kafka.start()
        try:
            await ensure_topics(self.settings.bootstrap, topic_specs(self.settings))
            models = model_ids(cfg.models)
            if not cfg.fleet_devices:
                for model_id in models:
                    await register_model(
                        self.settings, model_id, cfg.backbone, Cut.FREEZE6, cfg.num_classes
                    )
            env = {
                **child_env(self.settings, self.settings.bootstrap),
                **settings_env(self.settings),
            }
            supervisor = Supervisor(
                self._children(),
                log_dir=self.log_dir,
                env=env,
                on_event=self._emit,
                grace=10.0,
            )
            async with supervisor:
                pushers = None if cfg.fleet_devices else Pushers(self.settings, cfg, models)
                if pushers is not None:
                    await pushers.start()
                try:
                    if pushers is not None:
                        await self._warm_up(pushers)
                    result = await self._load_and_faults(supervisor, pushers, env)
                finally:
                    if pushers is not None:
                        await pushers.stop()
                result.restarts = {c.spec.name: c.restarts for c in supervisor.children}
                if self._on_settled is not None:
                    await self._on_settled(result)  # the stack still runs
        finally:
            await self.kafka.stop()
        result.faults = self._faults
        result.wall_seconds = time.monotonic() - self._started
        return result

    async def _warm_up(self, pushers: Pushers, timeout: float = 300.0) -> None:
        """Faults count from a stack that works: one push per model, and wait until every
        model has a trained version (the worker counted, the trainer trained)."""
        await pushers.warm_up()
        deadline = time.monotonic() + timeout
        while True:
            report, _ = await audit_deployment(self.settings)
            if report.models and all(m.versions >= 1 for m in report.models):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"the stack trained no version within {timeout:g} s")
            await asyncio.sleep(1.0)
        self._emit("warmed up: every model has a trained version")

    async def _wait_for_pushes(self, fleet: asyncio.Task[None], records: int = 50) -> None:
        """Faults count from when the fleet pushes (it builds its bank and base models
        first): until the feature log holds ``records`` records."""
        from pipeline.clients import make_consumer

        consumer = make_consumer(bootstrap=self.settings.bootstrap, group_id=None)
        await consumer.start()
        try:
            from aiokafka import TopicPartition

            topic = self.settings.topic_prefix + ".features"
            tps = [TopicPartition(topic, p) for p in range(self.settings.features_partitions)]
            while not fleet.done():
                if sum((await consumer.end_offsets(tps)).values()) >= records:
                    self._emit("the fleet pushes: faults count from now")
                    return
                await asyncio.sleep(1.0)
        finally:
            await consumer.stop()

    async def _fleet(self, env: dict[str, str]) -> None:
        """A ``fedex devices`` child for the run's duration (not supervised: it ends)."""
        cfg = self.config
        argv = fedex_argv(
            "devices",
            "--count", str(cfg.fleet_devices),
            "--models", str(cfg.models),
            "--duration", f"{cfg.duration_s:g}s",
            "--availability", "always",
            "--out", str(self.log_dir / "fleet.json"),
        )  # fmt: skip
        with (self.log_dir / "devices.log").open("ab") as log_file:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                preexec_fn=die_with_parent(os.getpid()),
            )
        try:
            code = await asyncio.wait_for(proc.wait(), cfg.duration_s + 900)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        self._emit(f"fleet exited with code {code}")

    async def _load_and_faults(
        self, supervisor: Supervisor, pushers: Pushers | None, env: dict[str, str]
    ) -> ChaosResult:
        cfg = self.config
        if pushers is not None:
            t0 = time.monotonic()
            faults = asyncio.create_task(self._inject(supervisor, t0))
            await pushers.run(t0 + cfg.duration_s)
        else:
            fleet = asyncio.create_task(self._fleet(env))
            await self._wait_for_pushes(fleet)
            faults = asyncio.create_task(self._inject(supervisor, time.monotonic()))
            await fleet
        await faults
        self._emit("load over; settling")
        settle_start = time.monotonic()
        report, seconds, settled = await self._settle(settle_start + cfg.settle_timeout_s)
        self._emit(
            f"audit: {'clean' if report.clean else f'{len(report.violations)} violations'}"
            f" ({'settled' if settled else 'NOT settled'}), {seconds:.1f} s"
        )
        return ChaosResult(
            report=report,
            audit_seconds=seconds,
            settled=settled,
            settle_seconds=time.monotonic() - settle_start,
            pushes_acked=pushers.acked if pushers else 0,
            samples_acked=pushers.samples if pushers else 0,
            push_retries=pushers.retries if pushers else 0,
        )

    async def _inject(self, supervisor: Supervisor, t0: float) -> None:
        for fault in sorted(self.config.faults, key=lambda f: f.at_s):
            await asyncio.sleep(max(0.0, t0 + fault.at_s - time.monotonic()))
            began = time.monotonic() - t0
            self._emit(f"fault: {fault.kind} for {fault.duration_s:g} s")
            if fault.kind is FaultKind.KILL_BROKER:
                self.kafka.kill()
                await asyncio.sleep(fault.duration_s)
                await self.kafka.start()
            elif fault.kind is FaultKind.PAUSE_BROKER:
                self.kafka.pause()
                try:
                    await asyncio.sleep(fault.duration_s)
                finally:
                    self.kafka.resume()
            else:
                name = "worker" if fault.kind is FaultKind.KILL_WORKER else "trainer"
                child = next(c for c in supervisor.children if c.spec.name == name)
                if child.process is not None and child.process.returncode is None:
                    child.process.kill()
            self._faults.append(
                {"kind": fault.kind.value, "at_s": round(began, 1), "duration_s": fault.duration_s}
            )
            self._emit(f"fault over: {fault.kind}")

    async def _settle(self, deadline: float) -> tuple[AuditReport, float, bool]:
        """Audit until nothing is pending, uncounted or in flight (or the deadline)."""
        while True:
            report, seconds = await audit_deployment(self.settings)
            busy = sum(
                m.pending_pushes + m.uncounted_pushes + m.in_flight_pushes for m in report.models
            )
            if busy == 0 and report.models:
                return report, seconds, True
            if time.monotonic() > deadline:
                return report, seconds, False
            await asyncio.sleep(2.0)
