"""``fedex bench fedavg``: FedEx and the FedAvg baseline side by side on one broker.

Same task for both arms, per seed: the real bank of the default world (rendered faces
through the pretrained backbone, :func:`lab.datafraction_bench.load_bank`), one model, its
base head ``v0`` (:func:`device_sim.heads.train_base_head`), the same devices (vendors and
identities from :meth:`World.device_profile`), and the same ``samples`` local samples per
device. Those samples are **fresh draws** (:class:`device_sim.fresh.FreshFeatures`: the
device's cell centre, fitted on the bank's train rows, plus its own within-cell variation):
every sample is a distinct observation, never a copy of another, so the trainer's
validation split holds no copy of a trained vector. Evaluation is the mean over devices of
each device's accuracy on the bank's *real* held-out rows of its vendor and identities
(never fitted, pushed or trained on); :func:`lab.fedavg_report.distinct_report` checks it
and the result records the check.

- **FedEx**: every device pushes its samples once (a float16 feature push); the real cloud
  loop trains the head: ``fedex worker`` and ``fedex trainer`` run as supervised children
  (as ``fedex up`` and the demo run them), the agents fire one trigger covering every
  push, the trainer trains from ``v0`` with this bench's recipe and the product's
  validation settings (whole validation devices, a share of the other samples, the
  promotion margin; recorded in ``trainer_settings``) and publishes ``v1``. Devices
  download the checkpoint blob. Devices never train.
- **FedAvg**, once per transfer precision (fp32 and fp16 by default, on the same seed):
  ``python -m lab.fedavg_server`` runs as a child process; the devices (this process,
  :class:`lab.fedavg_devices.FedAvgFleet`) train E local epochs per round when selected, on
  exactly the samples they pushed in the FedEx arm. Rounds run until the mean device
  accuracy reaches the FedEx arm's (or a cap).

Each seed's FedAvg curve gives the cost of reaching fixed targets
(:func:`lab.fedavg_report.targets_for`); the seeds give median and min–max of the ratios.
Bytes are real encoded message sizes. Wall times start when the cloud side is ready (the
children's consumer groups exist; the first broadcast arrived) and exclude the harness's
own accuracy measurements. This module is the device side; it reaches the trainer's code
only through child processes (apps never import each other).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch
from rich.console import Console

from device_sim.bank import FeatureBank
from device_sim.fresh import FreshFeatures
from device_sim.heads import new_head, train_base_head
from device_sim.world import World
from lab.fedavg_devices import DeviceData, FedAvgFleet
from lab.fedavg_report import (
    ABSOLUTE_TARGETS,
    GAIN_TARGETS,
    cost_at,
    distinct_report,
    headline,
    per_device,
    summarize,
    targets_for,
    vendor_report,
)
from pipeline import codec
from pipeline.checkpoints import CheckpointDType, encode_checkpoint
from pipeline.errors import FedexError
from pipeline.records import FeatureDType, FeaturePush, ModelUpdate, RoundBroadcast
from pipeline.settings import Settings
from pipeline.topics import Topics

if TYPE_CHECKING:
    from aiokafka import AIOKafkaProducer

    from pipeline.supervisor import Supervisor


class BenchError(FedexError):
    """The side-by-side run could not complete; the message says where."""


#: The trainer settings the FedEx arm runs with (the product's defaults unless the
#: environment sets them), recorded in the result.
TRAINER_SETTINGS = (
    "val_fraction",
    "val_device_fraction",
    "val_max_samples",
    "replay_max_samples",
    "promote_margin",
    "train_swa_start",
    "checkpoint_dtype",
)


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """What both arms share, and each arm's recipe."""

    devices: int = 150
    samples: int = 32
    seeds: int = 5
    seed: int = 0  # the first seed; seeds are seed, seed + 1, ...
    world: str = "default"  # a configuration of lab.datafraction_bench.CONFIGS
    model_id: str | None = None  # default: the world's first model
    world_seed: int = 0
    # targets: fixed accuracies, and shares of FedEx's gain over v0
    targets: tuple[float, ...] = ABSOLUTE_TARGETS
    gain_targets: tuple[float, ...] = GAIN_TARGETS
    # FedEx cloud recipe (the trainer's settings for this run)
    fedex_epochs: int = 30
    fedex_lr: float = 3e-3
    fedex_batch_size: int = 64
    # FedAvg, once per transfer precision
    fedavg_dtypes: tuple[str, ...] = ("float32", "float16")
    fraction: float = 0.1
    local_epochs: int = 5
    batch_size: int = 10
    lr: float = 0.1
    max_rounds: int = 300
    deadline_s: float = 30.0
    ready_timeout_s: float = 240.0
    job_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.seeds < 1 or self.devices < 1 or self.samples < 1:
            raise BenchError("seeds, devices and samples must be ≥ 1")
        for dtype in self.fedavg_dtypes:
            FeatureDType(dtype)  # raises on an unknown precision


# --------------------------------------------------------------------------- the task


@dataclass(frozen=True, slots=True)
class Device:
    """One device of a seed: its camera and identities, the fresh samples it pushes to
    FedEx and trains on in FedAvg (``sample_ids`` are their fresh rows), and its test rows
    (the bank's real held-out rows of its vendor and identities)."""

    device_id: str
    vendor: int
    identities: npt.NDArray[np.int64]
    sample_ids: npt.NDArray[np.int64]
    features: npt.NDArray[np.float16]
    labels: npt.NDArray[np.int32]
    eval_rows: npt.NDArray[np.int64]


def device_ids(model_id: str, count: int) -> list[str]:
    return [f"{model_id}-dev-{i:05d}" for i in range(count)]


def sample_identities(
    identity_sets: Sequence[npt.NDArray[np.int64]], samples: int, rng: np.random.Generator
) -> npt.NDArray[np.int64]:
    """[devices, samples]: each device's samples' identities, uniform over its own."""
    return np.stack([rng.choice(ids, size=samples) for ids in identity_sets]).astype(np.int64)


def make_devices(
    bank: FeatureBank, world: World, model_id: str, count: int, samples: int, seed: int
) -> list[Device]:
    """``count`` devices of ``model_id``, each with ``samples`` fresh samples of its vendor
    and identities (a feature model fitted on the bank's train rows, seeded by ``seed``)
    and its held-out bank rows for evaluation."""
    ids = device_ids(model_id, count)
    profiles = [world.device_profile(model_id, d) for d in ids]
    vendors = np.asarray([p.vendor for p in profiles], dtype=np.int64)
    fresh = FreshFeatures(bank, vendors=vendors, seed=seed)
    rng = np.random.default_rng([seed, count, samples])
    identities = sample_identities([p.identities for p in profiles], samples, rng)
    owners = np.repeat(np.arange(count, dtype=np.int64), samples)
    rows = fresh.draw(bank.model_index(model_id), owners, identities.ravel(), rng)
    rows = rows.reshape(count, samples)
    features = fresh.features(rows.ravel()).reshape(count, samples, -1)
    return [
        Device(
            d,
            p.vendor,
            p.identities,
            rows[i],
            features[i],
            identities[i].astype(np.int32),
            bank.held_out(model_id, p.vendor, p.identities),
        )
        for i, (d, p) in enumerate(zip(ids, profiles, strict=True))
    ]


def validation_mask(
    settings: Settings, model_id: str, devices: Sequence[Device]
) -> npt.NDArray[np.bool_]:
    """Which pushed samples (device order, then sample order) the trainer holds out for
    validation: its own rule over the samples' keys (whole validation devices and a share
    of the others' samples, :class:`pipeline.samples.ValidationRule`)."""
    from pipeline.samples import ValidationRule

    rule = ValidationRule(settings.val_fraction, settings.val_device_fraction)
    keys = [(d.device_id, int(s)) for d in devices for s in d.sample_ids]
    return rule.mask(model_id, keys)


def distinct_check(
    bank: FeatureBank, devices: Sequence[Device], validation: npt.NDArray[np.bool_]
) -> dict[str, int]:
    """:func:`distinct_report` of the task: the samples FedEx's trainer trains on, those
    it validates on (``validation``), and the test rows. FedAvg trains on both kinds of
    sample, so no copy among the samples and none of them in the test rows covers it."""
    pushed = np.concatenate([d.features for d in devices])
    test, _ = bank.take(np.concatenate([d.eval_rows for d in devices]))
    return distinct_report(pushed[~validation], pushed[validation], test)


class Evaluator:
    """Mean over devices of each device's held-out accuracy, for any head state; and the
    accuracy per vendor."""

    def __init__(self, bank: FeatureBank, devices: Sequence[Device]) -> None:
        kept = [d for d in devices if d.eval_rows.size]
        rows = np.concatenate([d.eval_rows for d in kept])
        self.owner = np.concatenate([np.full(d.eval_rows.size, i) for i, d in enumerate(kept)])
        features, labels = bank.take(rows)
        self.x = torch.as_tensor(features.astype(np.float32))
        self.y = labels
        self.domains = bank.domains[rows]
        self.devices = len(kept)
        self.head = new_head(bank.backbone, bank.cut, bank.num_classes)
        self.template = {k: v.detach().clone() for k, v in self.head.state_dict().items()}

    @torch.no_grad()
    def correct(self, tensors: Mapping[str, Any]) -> npt.NDArray[np.bool_]:
        """Whether the head of ``tensors`` gets each test row right."""
        state = dict(self.template)
        for name, value in tensors.items():
            if isinstance(value, torch.Tensor):
                state[name] = value.detach().to(torch.float32).clone()
            else:
                state[name] = torch.from_numpy(np.array(value, dtype=np.float32))
        self.head.load_state_dict(state)
        self.head.eval()
        return np.asarray(self.head(self.x).argmax(1).numpy() == self.y)

    def __call__(self, tensors: Mapping[str, Any]) -> float:
        correct = self.correct(tensors).astype(np.float64)
        hits = np.bincount(self.owner, weights=correct, minlength=self.devices)
        totals = np.bincount(self.owner, minlength=self.devices)
        return float((hits / totals).mean())

    def vendors(self, tensors: Mapping[str, Any]) -> dict[str, Any]:
        """:func:`vendor_report` of the head: per vendor, spread, variance, worst."""
        return vendor_report(self.correct(tensors), self.domains)


# --------------------------------------------------------------------------- helpers


async def wait_for_groups(bootstrap: str, groups: Sequence[str], timeout: float) -> None:
    """Until a consumer group of each name exists (its first member joined; a group appears
    on the broker at its first JoinGroup). Whether its partitions are assigned yet is not
    asked: aiokafka's DescribeGroups does not decode Kafka 4.0's answer, and the records
    wait durably in any case, so at most a rebalance's time lands in the wall time."""
    from aiokafka.errors import KafkaError

    from pipeline.clients import make_admin

    admin = make_admin(bootstrap=bootstrap, client_id="fedex-bench-fedavg")
    await admin.start()
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                present = {g[0] for g in await admin.list_consumer_groups()}
            except KafkaError:  # e.g. no group coordinator yet on a fresh broker
                present = set()
            if present >= set(groups):
                return
            if time.monotonic() > deadline:
                raise BenchError(
                    f"consumer groups {sorted(set(groups) - present)} absent {timeout:g} s "
                    "after the children started; see their logs"
                )
            await asyncio.sleep(0.5)
    finally:
        await admin.close()


# --------------------------------------------------------------------------- both arms' inputs


@dataclass(frozen=True, slots=True)
class Arm:
    """What either arm runs on: the broker's settings (a fresh topic prefix), the task
    (bank, devices, base head, model), the recipes, the shared evaluation and the console."""

    settings: Settings
    bank: FeatureBank
    devices: Sequence[Device]
    base_state: dict[str, torch.Tensor]
    model_id: str
    cfg: BenchConfig
    seed: int
    evaluate: Evaluator
    console: Console

    @property
    def topics(self) -> Topics:
        return Topics(self.settings.topic_prefix)

    def say(self, message: str) -> None:
        self.console.print(f"seed {self.seed}: {message}", highlight=False)


# --------------------------------------------------------------------------- FedEx arm


async def run_fedex_arm(arm: Arm) -> dict[str, Any]:
    """Every device pushes once; the worker and trainer (children) publish ``v1``; the
    devices' accuracy with it, and what the run cost them."""
    from pipeline.checkpoints import LocalCheckpointStore, decode_checkpoint
    from pipeline.publishing import register_model
    from pipeline.registry import RegistryFollower

    settings, bank, model_id = arm.settings, arm.bank, arm.model_id
    store = LocalCheckpointStore(settings.checkpoint_dir)
    await register_model(
        settings, model_id, bank.backbone, bank.cut, bank.num_classes, arm.base_state, store=store
    )
    arrived: asyncio.Future[ModelUpdate] = asyncio.get_running_loop().create_future()

    async def on_update(update: ModelUpdate) -> None:
        if update.model_id == model_id and update.parent_version and not arrived.done():
            arrived.set_result(update)

    supervisor = _fedex_cloud(arm)
    follower = RegistryFollower(
        bootstrap=settings.bootstrap, topic=arm.topics.models, on_update=on_update
    )
    async with supervisor, follower:
        await wait_for_groups(
            settings.bootstrap,
            [f"{settings.topic_prefix}-agents", f"{settings.topic_prefix}-trainers"],
            arm.cfg.ready_timeout_s,
        )
        arm.say("fedex: worker and trainer are consuming; devices push")
        update, up, wall = await _push_and_await_version(arm, arrived)
    blob = update.checkpoint if update.checkpoint is not None else store.get(update.checkpoint_uri)
    state, _ = decode_checkpoint(blob, expected_sha256=update.sha256)
    accuracy = arm.evaluate(state)
    arm.say(
        f"fedex: {update.version} accuracy {accuracy:.4f} in {wall:.1f} s "
        f"(trained {update.metrics.train_seconds:.2f} s on {update.metrics.train_samples} "
        f"samples, validated on {update.metrics.eval_samples}; is_best {update.is_best})"
    )
    return _fedex_result(arm, update, state, accuracy, up, wall)


def _fedex_cloud(arm: Arm) -> Supervisor:
    """The worker and a CPU trainer as supervised children, the trainer's recipe this
    bench's and its trigger due once every device has pushed."""
    from pipeline.kafka_local import free_port
    from pipeline.supervisor import Supervisor, child_env, cloud_children

    settings, cfg = arm.settings, arm.cfg
    env = child_env(settings, settings.bootstrap)
    env.update(
        FEDEX_MIN_SAMPLES=str(cfg.samples * len(arm.devices)),
        FEDEX_TRAIN_EPOCHS=str(cfg.fedex_epochs),
        FEDEX_TRAIN_LR=str(cfg.fedex_lr),
        FEDEX_TRAIN_BATCH_SIZE=str(cfg.fedex_batch_size),
        FEDEX_WORKER_PORT=str(free_port()),
    )
    return Supervisor(
        [c for c in cloud_children(trainers=["cpu"]) if c.name != "server"],
        log_dir=settings.log_dir,
        env=env,
        grace=10,
        on_event=lambda m: arm.console.print(f"[dim]fedex: {m}[/dim]", highlight=False),
    )


async def _push_and_await_version(
    arm: Arm, arrived: asyncio.Future[ModelUpdate]
) -> tuple[ModelUpdate, list[int], float]:
    """Every device's push, then the trained version: that update, the pushes' encoded
    sizes, and the wall time from the first push to the version's arrival."""
    from pipeline.clients import make_producer

    settings = arm.settings
    producer = make_producer(bootstrap=settings.bootstrap, client_id="fedex-bench-devices")
    await producer.start()
    try:
        started = time.perf_counter()
        up = await _push_every_device(arm, producer)
        try:
            update = await asyncio.wait_for(arrived, arm.cfg.job_timeout_s)
        except TimeoutError:
            raise BenchError(
                f"no model version {arm.cfg.job_timeout_s:g} s after the pushes; see "
                f"{settings.log_dir}/worker.log and trainer-0.log"
            ) from None
        wall = time.perf_counter() - started
    finally:
        await producer.stop()
    return update, up, wall


def push_of(arm: Arm, device: Device, now_ms: int) -> FeaturePush:
    """A device's one float16 feature push: its fresh samples, keyed by their rows."""
    return FeaturePush(
        model_id=arm.model_id,
        device_id=device.device_id,
        backbone=arm.bank.backbone,
        cut=arm.bank.cut,
        dtype=FeatureDType.FLOAT16,
        sample_ids=device.sample_ids.astype(np.uint64),
        labels=device.labels,
        timestamps_ms=np.full(device.labels.size, now_ms, dtype=np.int64),
        features=device.features,
    )


async def _push_every_device(arm: Arm, producer: AIOKafkaProducer) -> list[int]:
    """One float16 feature push per device, all acknowledged; their encoded sizes."""
    topic, key = arm.topics.features, codec.encode_key(arm.model_id)
    now = int(time.time() * 1000)
    up: list[int] = []
    sends = []
    for device in arm.devices:
        value = codec.encode_push(push_of(arm, device, now))
        up.append(len(value))
        sends.append(await producer.send(topic, value, key=key))
    await asyncio.gather(*sends)
    return up


def _fedex_result(
    arm: Arm,
    update: ModelUpdate,
    state: Mapping[str, Any],
    accuracy: float,
    up: Sequence[int],
    wall: float,
) -> dict[str, Any]:
    down = [update.size] * len(arm.devices)
    cfg = arm.cfg
    metrics = update.metrics
    return {
        "accuracy": accuracy,
        "vendors": arm.evaluate.vendors(state),
        "version": update.version,
        "is_best": update.is_best,
        "val_accuracy": metrics.val_accuracy,
        "champion_val_accuracy": metrics.champion_val_accuracy,
        "train_samples": metrics.train_samples,
        "val_samples": metrics.val_samples,
        "eval_samples": metrics.eval_samples,
        "replay_samples": metrics.replay_samples,
        "cloud_train_seconds": metrics.train_seconds,
        "checkpoint_encoding": update.encoding,
        "rounds": 1,
        **_bytes_per_device(up, down),
        "device_compute_seconds_per_device": 0.0,
        "wall_seconds": wall,
        "recipe": {
            "epochs": cfg.fedex_epochs,
            "lr": cfg.fedex_lr,
            "batch_size": cfg.fedex_batch_size,
            "optimizer": "AdamW (trainer.recipe)",
        },
    }


def _bytes_per_device(up: Sequence[int], down: Sequence[int]) -> dict[str, dict[str, float]]:
    """Bytes up, down and both, per device (mean, min, max)."""
    return {
        "bytes_up_per_device": per_device(up),
        "bytes_down_per_device": per_device(down),
        "bytes_per_device": per_device([u + d for u, d in zip(up, down, strict=True)]),
    }


# --------------------------------------------------------------------------- FedAvg arm


@dataclass(slots=True)
class Rounds:
    """The FedAvg rounds as the devices see their broadcasts: the accuracy curve, the
    protocol's wall clock (the harness's evaluations left out), the round that reached
    ``target`` and the last broadcast with its accuracy and wall time."""

    fleet: FedAvgFleet
    arm: Arm
    target: float
    label: str = "fedavg"
    curve: list[dict[str, float]] = field(default_factory=list)
    start: float | None = None
    eval_s: float = 0.0
    reached: int | None = None
    last: tuple[RoundBroadcast, float, float] | None = None

    def bytes_mean(self) -> float:
        return float(
            np.mean([ledger.bytes_up + ledger.bytes_down for ledger in self.fleet.ledgers.values()])
        )

    async def on_broadcast(self, broadcast: RoundBroadcast, size: int) -> bool:
        """Record the round; True (stop) once its head reaches the target."""
        now = time.perf_counter()
        if self.start is None:
            self.start = now
        # wall time of the protocol: measuring accuracy is the harness's, not FedAvg's
        elapsed = now - self.start - self.eval_s
        accuracy = await asyncio.to_thread(self.arm.evaluate, broadcast.tensors)
        self.eval_s += time.perf_counter() - now
        self.curve.append(
            {
                "round": broadcast.round,
                "accuracy": accuracy,
                "wall_seconds": elapsed,
                "bytes_per_device": self.bytes_mean(),
            }
        )
        self.last = (broadcast, accuracy, elapsed)
        if broadcast.round % 25 == 0:
            self.arm.say(
                f"{self.label}: round {broadcast.round} accuracy {accuracy:.4f} "
                f"({self.bytes_mean() / 1e3:,.0f} kB per device so far)"
            )
        if accuracy >= self.target:
            self.reached = broadcast.round
            return True
        return False


async def run_fedavg_arm(
    arm: Arm, target: float, *, workdir: Path, dtype: FeatureDType = FeatureDType.FLOAT32
) -> dict[str, Any]:
    """The FedAvg server (a child process) and the devices (this process) run rounds, the
    head sent both ways in ``dtype``, until the devices' accuracy reaches ``target`` or the
    round cap; what that cost them."""
    argv = _fedavg_server_argv(arm, workdir, dtype)
    data = {d.device_id: DeviceData(d.features, d.labels) for d in arm.devices}
    fleet = FedAvgFleet(
        bootstrap=arm.settings.bootstrap,
        topics=arm.topics,
        model_id=arm.model_id,
        devices=data,
        dtype=dtype,
        seed=arm.seed,
    )
    rounds = Rounds(fleet, arm, target, label=f"fedavg {dtype.value}")
    arm.settings.log_dir.mkdir(parents=True, exist_ok=True)
    log_path = arm.settings.log_dir / f"fedavg-server-{dtype.value}.log"
    async with fleet:
        process = await _start_fedavg_server(arm, argv, log_path)
        arm.say(f"fedavg {dtype.value}: server pid {process.pid} (log {log_path})")
        last = await _serve_rounds(arm, rounds, process, log_path)
    if last is None or rounds.last is None:
        raise BenchError(f"the FedAvg server sent no round; see {log_path}")
    return _fedavg_result(arm, rounds, rounds.last, dtype)


def _fedavg_server_argv(arm: Arm, workdir: Path, dtype: FeatureDType) -> list[str]:
    """The server's command line; its inputs (``v0``, the device ids) written to
    ``workdir``."""
    bank, cfg = arm.bank, arm.cfg
    init = workdir / "fedavg-init.safetensors"
    init.write_bytes(encode_checkpoint(arm.base_state, dtype=CheckpointDType.FP32))
    ids_file = workdir / "fedavg-devices.txt"
    ids_file.write_text("".join(f"{d.device_id}\n" for d in arm.devices))
    return [
        sys.executable,
        "-m",
        "lab.fedavg_server",
        *("--model", arm.model_id, "--backbone", bank.backbone.value, "--cut", bank.cut.value),
        *("--num-classes", str(bank.num_classes), "--init", str(init)),
        *("--devices-file", str(ids_file), "--rounds", str(cfg.max_rounds)),
        *("--fraction", str(cfg.fraction), "--local-epochs", str(cfg.local_epochs)),
        *("--batch-size", str(cfg.batch_size), "--lr", str(cfg.lr)),
        *("--deadline-s", str(cfg.deadline_s), "--seed", str(arm.seed)),
        *("--dtype", dtype.value),
    ]


async def _start_fedavg_server(
    arm: Arm, argv: Sequence[str], log_path: Path
) -> asyncio.subprocess.Process:
    from pipeline.processes import die_with_parent
    from pipeline.supervisor import child_env

    with log_path.open("ab") as log_file:
        return await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log_file,
            stderr=asyncio.subprocess.STDOUT,
            env=child_env(arm.settings, arm.settings.bootstrap),
            preexec_fn=die_with_parent(os.getpid()),
        )


async def _serve_rounds(
    arm: Arm, rounds: Rounds, process: asyncio.subprocess.Process, log_path: Path
) -> RoundBroadcast | None:
    """The devices serve rounds until the run ends (or the server exits); the server is
    stopped either way. Returns the devices' last broadcast."""
    devices_task = asyncio.create_task(
        rounds.fleet.run(on_broadcast=rounds.on_broadcast, idle_timeout=arm.cfg.ready_timeout_s)
    )
    server_task = asyncio.create_task(process.wait())
    try:
        await asyncio.wait({devices_task, server_task}, return_when=asyncio.FIRST_COMPLETED)
        if not devices_task.done():
            # the server exited: its final broadcast may still be on the way to us
            done, _ = await asyncio.wait({devices_task}, timeout=10)
            if not done:
                raise BenchError(
                    f"the FedAvg server exited with code {process.returncode} before "
                    f"the run ended; see {log_path}"
                )
        return devices_task.result()
    finally:
        for task in (devices_task, server_task):
            task.cancel()
        await asyncio.gather(devices_task, server_task, return_exceptions=True)
        await _stop_process(process)


async def _stop_process(process: asyncio.subprocess.Process) -> None:
    """SIGTERM, 15 s of grace, then SIGKILL."""
    if process.returncode is None:
        process.terminate()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(process.wait(), 15)
    if process.returncode is None:
        process.kill()
        await process.wait()


def _fedavg_result(
    arm: Arm, rounds: Rounds, last: tuple[RoundBroadcast, float, float], dtype: FeatureDType
) -> dict[str, Any]:
    final_broadcast, accuracy, wall = last
    # Every device ends with the global head, shipped like FedEx's (fp16 safetensors).
    final_blob = len(
        encode_checkpoint(
            {k: torch.from_numpy(np.array(v)) for k, v in final_broadcast.tensors.items()},
            dtype=CheckpointDType.FP16,
        )
    )
    ledgers = [rounds.fleet.ledgers[d.device_id] for d in arm.devices]
    up = [ledger.bytes_up for ledger in ledgers]
    down = [ledger.bytes_down + final_blob for ledger in ledgers]
    cfg = arm.cfg
    return {
        "accuracy": accuracy,
        "vendors": arm.evaluate.vendors(final_broadcast.tensors),
        "target": rounds.target,
        "reached": rounds.reached is not None,
        # aggregations done when the reported head was broadcast
        "rounds": final_broadcast.round,
        **_bytes_per_device(up, down),
        "device_compute_seconds_per_device": per_device([x.compute_seconds for x in ledgers]),
        "device_compute_seconds_total": float(sum(x.compute_seconds for x in ledgers)),
        "participations_per_device": per_device([x.rounds for x in ledgers]),
        "wall_seconds": wall,
        "final_download_bytes": final_blob,
        "curve": rounds.curve,
        "recipe": {
            "fraction": cfg.fraction,
            "local_epochs": cfg.local_epochs,
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
            "optimizer": "SGD (lab.fedavg_devices.local_update)",
            "server_lr": 1.0,
            "transfer_dtype": dtype.value,
            "max_rounds": cfg.max_rounds,
        },
    }


def with_costs(
    fedavg: dict[str, Any], targets: Sequence[Mapping[str, Any]], fedex: Mapping[str, Any]
) -> dict[str, Any]:
    """``fedavg`` with its cost of reaching each target (:func:`cost_at`), in order."""
    costs = [
        {
            "name": t["name"],
            "accuracy_needed": t["accuracy"],
            **cost_at(
                fedavg["curve"],
                t["accuracy"],
                final_download=fedavg["final_download_bytes"],
                fedex_bytes=fedex["bytes_per_device"]["mean"],
                fedex_wall=fedex["wall_seconds"],
            ),
        }
        for t in targets
    ]
    return {**fedavg, "costs": costs}


# --------------------------------------------------------------------------- one seed


@dataclass(frozen=True, slots=True)
class Task:
    """What every seed shares: the bank, its world and the model."""

    bank: FeatureBank
    world: World
    model_id: str


async def run_seed(
    settings: Settings, task: Task, cfg: BenchConfig, seed: int, console: Console
) -> dict[str, Any]:
    """One seed: its base head and fresh samples, the FedEx arm, then FedAvg at every
    precision until FedEx's accuracy; the targets and FedAvg's cost of each."""
    from pipeline.topics import ensure_topics, fedavg_topic_specs, topic_specs

    bank, model_id = task.bank, task.model_id
    base = train_base_head(bank, model_id, seed=seed)
    devices = make_devices(bank, task.world, model_id, cfg.devices, cfg.samples, seed)
    distinct = distinct_check(bank, devices, validation_mask(settings, model_id, devices))
    evaluate = Evaluator(bank, devices)
    base_accuracy = evaluate(base.state_dict)
    console.print(
        f"seed {seed}: {model_id}, {len(devices)} devices x {cfg.samples} fresh samples, "
        f"{bank.num_classes} classes; v0 accuracy {base_accuracy:.4f}; copies {distinct}",
        highlight=False,
    )
    prefix = f"{settings.topic_prefix}-fedavg-bench-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="fedex-fedavg-bench-") as tmp:
        live = settings.model_copy(update={"topic_prefix": prefix, "home": Path(tmp)})
        # the bank stays in the real home; logs and checkpoints of this run in a temp one
        await ensure_topics(live.bootstrap, [*topic_specs(live), *fedavg_topic_specs(live)])
        arm = Arm(live, bank, devices, base.state_dict, model_id, cfg, seed, evaluate, console)
        try:
            fedex = await run_fedex_arm(arm)
            targets = targets_for(base_accuracy, fedex["accuracy"], cfg.targets, cfg.gain_targets)
            fedavg = {}
            for dtype in cfg.fedavg_dtypes:
                run = await run_fedavg_arm(
                    arm, fedex["accuracy"], workdir=Path(tmp), dtype=FeatureDType(dtype)
                )
                fedavg[dtype] = with_costs(run, targets, fedex)
        finally:
            kept = settings.log_dir / "fedavg-bench" / f"seed-{seed}"
            kept.mkdir(parents=True, exist_ok=True)
            for log in live.log_dir.glob("*.log"):
                shutil.copyfile(log, kept / log.name)
    return {
        "seed": seed,
        "base_accuracy": base_accuracy,
        "base_vendors": evaluate.vendors(base.state_dict),
        "distinct": distinct,
        "targets": targets,
        "fedex": fedex,
        "fedavg": fedavg,
        "logs": str(kept),
    }


# --------------------------------------------------------------------------- both


def trainer_settings(settings: Settings) -> dict[str, Any]:
    """The trainer settings the FedEx arm ran with (:data:`TRAINER_SETTINGS`)."""
    return {name: getattr(settings, name) for name in TRAINER_SETTINGS}


def load_task(settings: Settings, cfg: BenchConfig) -> Task:
    """The real bank of ``cfg.world`` (built once into ``$FEDEX_HOME/banks`` through the
    pretrained backbone) and the model of the comparison."""
    from dataclasses import replace

    from lab.datafraction_bench import CONFIGS, load_bank

    bank = load_bank(cfg.world, settings.bank_dir, seed=cfg.world_seed, home=settings.home)
    world = World(replace(CONFIGS[cfg.world][0], seed=cfg.world_seed))
    return Task(bank, world, cfg.model_id or bank.model_ids[0])


async def run_side_by_side(
    settings: Settings, cfg: BenchConfig, console: Console, *, task: Task | None = None
) -> dict[str, Any]:
    """Every seed's both arms on the broker at ``settings.bootstrap`` (each seed's topics
    under a fresh prefix), and their summary."""
    task = task or load_task(settings, cfg)
    bank = task.bank
    seeds = []
    for seed in range(cfg.seed, cfg.seed + cfg.seeds):
        seeds.append(await run_seed(settings, task, cfg, seed, console))
    summary = summarize(seeds, cfg.fedavg_dtypes)
    head = headline(summary)
    ratio = head["bytes_ratio"]
    return {
        "task": {
            "model_id": task.model_id,
            "devices": cfg.devices,
            "samples_per_device": cfg.samples,
            "num_classes": bank.num_classes,
            "backbone": bank.backbone.value,
            "cut": bank.cut.value,
            "bank": bank.path.name,
            "weights_sha256": bank.spec.get("weights_sha256"),
            "world": asdict(task.world.config),
            "head_parameters": _head_parameters(bank),
            "data": (
                "fresh draws (device_sim.fresh.FreshFeatures, fitted on the bank's train rows): "
                "every pushed sample a distinct observation; FedAvg's devices train on exactly "
                "the samples they pushed to FedEx"
            ),
            "evaluation": (
                "mean over devices of each device's accuracy on the bank's real held-out rows "
                "of its vendor and identities (never fitted, pushed or trained on); per vendor "
                "pooled over its rows"
            ),
            "distinct": [s["distinct"] for s in seeds],
        },
        "config": asdict(cfg),
        "trainer_settings": trainer_settings(settings),
        "seeds": seeds,
        "summary": summary,
        "headline": head,
        "bytes_ratio_fedavg_over_fedex": ratio,
        "target_ratio": 20.0,
        "meets_target": bool(ratio is not None and head["reached"] == head["of"] and ratio >= 20),
    }


def _head_parameters(bank: FeatureBank) -> int:
    head = new_head(bank.backbone, bank.cut, bank.num_classes)
    return int(sum(p.numel() for p in head.state_dict().values() if p.is_floating_point()))


def run_bench(
    settings: Settings, cfg: BenchConfig, out: Path | None = None, *, keep: bool = False
) -> Path:
    """The command: a broker (:func:`lab.bench_broker.bench_kafka`: its topics deleted
    after), both arms for every seed, the tables and the JSON."""
    from lab.bench_broker import bench_kafka
    from lab.benchio import write_result
    from lab.fedavg_report import print_report

    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # the target table's ranges, unwrapped in a log
    started = time.perf_counter()

    async def run() -> dict[str, Any]:
        async with bench_kafka(settings, keep=keep) as bootstrap:
            live = settings.model_copy(update={"kafka_bootstrap": bootstrap})
            return await run_side_by_side(live, cfg, console)

    result = asyncio.run(run())
    result["seconds"] = round(time.perf_counter() - started, 1)
    print_report(result, console)
    path = write_result("fedavg", result, out)
    console.print(f"wrote {path}")
    return path
