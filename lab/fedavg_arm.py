"""What either arm of :mod:`lab.fedavg_bench` runs on: the configuration both arms share
(:class:`BenchConfig`), one seed's inputs (:class:`Arm`), the readiness wait for the cloud's
children and the per-device byte accounting both arms report alike.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from rich.console import Console

from device_sim.bank import FeatureBank
from lab.fedavg_report import ABSOLUTE_TARGETS, GAIN_TARGETS, per_device
from lab.fedavg_task import Device, Evaluator
from pipeline.errors import FedexError
from pipeline.records import FeatureDType
from pipeline.settings import Settings
from pipeline.topics import Topics


class BenchError(FedexError):
    """The side-by-side run could not complete; the message says where."""


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """What both arms share, and each arm's recipe."""

    devices: int = 150
    samples: int = 32
    seeds: int = 5
    seed: int = 0  # the first seed; seeds are seed, seed + 1, ...
    world: str = "default"  # a configuration of lab.bench_banks.CONFIGS
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


def bytes_per_device(up: Sequence[int], down: Sequence[int]) -> dict[str, dict[str, float]]:
    """Bytes up, down and both, per device (mean, min, max)."""
    return {
        "bytes_up_per_device": per_device(up),
        "bytes_down_per_device": per_device(down),
        "bytes_per_device": per_device([u + d for u, d in zip(up, down, strict=True)]),
    }
