"""The FedAvg arm of :mod:`lab.fedavg_bench`: ``python -m lab.fedavg_server`` as a child
process and the devices (:class:`lab.fedavg_devices.FedAvgFleet`, this process) run rounds
until the devices' accuracy reaches FedEx's (or the round cap); what that cost them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lab.fedavg_arm import Arm, BenchError, bytes_per_device
from lab.fedavg_devices import DeviceData, FedAvgFleet
from lab.fedavg_report import per_device
from pipeline.checkpoints import CheckpointDType, encode_checkpoint
from pipeline.records import FeatureDType, RoundBroadcast


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
        **bytes_per_device(up, down),
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
