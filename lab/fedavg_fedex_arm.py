"""The FedEx arm of :mod:`lab.fedavg_bench`: every device pushes its samples once, the real
cloud loop (``fedex worker`` and ``fedex trainer`` as supervised children) trains ``v1``,
and the devices download it. Devices never train.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lab.feature_pushes import feature_push
from lab.fedavg_arm import Arm, BenchError, bytes_per_device, wait_for_groups
from lab.fedavg_task import Device
from pipeline import codec
from pipeline.records import FeaturePush, ModelUpdate

if TYPE_CHECKING:
    from aiokafka import AIOKafkaProducer

    from pipeline.supervisor import Supervisor


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
    return feature_push(
        arm.model_id,
        device.device_id,
        backbone=arm.bank.backbone,
        cut=arm.bank.cut,
        sample_ids=device.sample_ids,
        labels=device.labels,
        features=device.features,
        timestamp_ms=now_ms,
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
        **bytes_per_device(up, down),
        "device_compute_seconds_per_device": 0.0,
        "wall_seconds": wall,
        "recipe": {
            "epochs": cfg.fedex_epochs,
            "lr": cfg.fedex_lr,
            "batch_size": cfg.fedex_batch_size,
            "optimizer": "AdamW (trainer.recipe)",
        },
    }
