"""The FedAvg baseline's server: the comparison FedEx is measured against (issue 5).

Classic FedAvg (McMahan et al. 2017) over the same Kafka stack and the same thawed layers as
FedEx. Each round the server picks a fraction of the devices, broadcasts the global head on
the round topic (with the local recipe: E epochs of SGD, batch size, learning rate), and
waits on the update topic until ``quorum`` of the selected devices reported or the deadline
passed. It then averages their model deltas weighted by sample count and applies the step
(``w += server_lr · mean delta``; a ``gradient`` update is a FedSGD step ``w -= server_lr ·
mean gradient``). Updates of other runs, other or earlier rounds, from devices not selected,
repeated or misshapen are ignored and counted.

Pure parts (device selection, :class:`WeightedMean`, :class:`Round`, :func:`apply_step`)
are unit-tested; :class:`FedAvgServer` is the thin I/O shell. The server holds the head as
numpy arrays (its floating state entries) and never imports torch, so it starts fast.

    python -m lab.fedavg_server --model faces-1 --init head.safetensors --devices-file ids.txt
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import logging
import math
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from pipeline import codec
from pipeline.duplex import Duplex
from pipeline.errors import ConfigError
from pipeline.lifecycle import Service
from pipeline.records import (
    Backbone,
    Cut,
    FeatureDType,
    RoundBroadcast,
    RoundUpdate,
    TensorMap,
    UpdateKind,
)
from pipeline.topics import Topics

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

Arrays = dict[str, npt.NDArray[np.float32]]


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True, slots=True)
class FedAvgConfig:
    """One FedAvg run. ``fraction`` of the devices are selected per round (at least
    ``min_selected``); a round closes when ``ceil(quorum · selected)`` reported or after
    ``deadline_s``. ``local_epochs = 0`` asks for gradients (FedSGD) instead of deltas."""

    rounds: int = 100
    fraction: float = 0.1
    min_selected: int = 1
    quorum: float = 1.0
    deadline_s: float = 30.0
    local_epochs: int = 5
    batch_size: int = 10
    lr: float = 0.1
    server_lr: float = 1.0
    dtype: FeatureDType = FeatureDType.FLOAT32
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rounds < 0:
            raise ConfigError(f"rounds must be ≥ 0, got {self.rounds}")
        if not 0.0 < self.fraction <= 1.0 or not 0.0 < self.quorum <= 1.0:
            raise ConfigError("fraction and quorum must be in (0, 1]")
        if self.min_selected < 1 or self.batch_size < 1 or self.local_epochs < 0:
            raise ConfigError("min_selected, batch_size must be ≥ 1 and local_epochs ≥ 0")
        if not self.deadline_s > 0 or not self.lr > 0 or not self.server_lr > 0:
            raise ConfigError("deadline_s, lr and server_lr must be > 0")

    @property
    def kind(self) -> UpdateKind:
        return UpdateKind.GRADIENT if self.local_epochs == 0 else UpdateKind.DELTA


def select_devices(
    population: Sequence[str], fraction: float, round_no: int, *, seed: int, minimum: int = 1
) -> tuple[str, ...]:
    """``max(minimum, round(fraction · N))`` distinct devices, uniform, sorted; a function
    of (population, seed, round) alone, so a restarted server selects the same."""
    if not population:
        raise ConfigError("FedAvg needs at least one device")
    m = min(len(population), max(minimum, round(fraction * len(population))))
    rng = np.random.default_rng([seed, round_no])
    picked = rng.choice(len(population), size=m, replace=False)
    return tuple(sorted(population[i] for i in picked))


def quorum_size(selected: int, quorum: float) -> int:
    return max(1, math.ceil(quorum * selected - 1e-9)) if selected else 0


# --------------------------------------------------------------------------- aggregation


class WeightedMean:
    """Sample-weighted mean of named tensors: ``initialize`` / ``add`` / ``result``.
    Accumulates in float64 so the order of arrival does not change the result."""

    def __init__(self) -> None:
        self.initialize()

    def initialize(self) -> None:
        self._sums: dict[str, npt.NDArray[np.float64]] = {}
        self.weight = 0
        self.count = 0

    def add(self, weight: int, tensors: TensorMap) -> None:
        if weight <= 0:
            raise ValueError(f"weight must be positive, got {weight}")
        for name, value in tensors.items():
            scaled = np.asarray(value, dtype=np.float64) * weight
            if name in self._sums:
                self._sums[name] += scaled
            else:
                self._sums[name] = scaled
        self.weight += weight
        self.count += 1

    def result(self) -> Arrays:
        """The mean (float32); empty when nothing was added."""
        if not self.weight:
            return {}
        return {k: (v / self.weight).astype(np.float32) for k, v in self._sums.items()}


def apply_step(
    state: Mapping[str, npt.NDArray[np.float32]],
    mean: Mapping[str, npt.NDArray[np.float32]],
    kind: UpdateKind,
    server_lr: float,
) -> Arrays:
    """The new global head: ``w + lr·delta`` or ``w - lr·gradient``; entries without an
    update are kept."""
    sign = 1.0 if kind is UpdateKind.DELTA else -1.0
    return {
        name: (value + np.float32(sign * server_lr) * mean[name]).astype(np.float32)
        if name in mean
        else value
        for name, value in state.items()
    }


# --------------------------------------------------------------------------- round bookkeeping


class OfferOutcome(enum.StrEnum):
    """What the server did with an update."""

    ACCEPTED = "accepted"
    INVALID = "invalid"  # the codec rejected it
    OTHER_MODEL = "other_model"
    OTHER_RUN = "other_run"
    LATE = "late"  # an earlier round of this run
    OTHER_ROUND = "other_round"
    NOT_SELECTED = "not_selected"
    DUPLICATE = "duplicate"
    MISMATCH = "mismatch"  # tensor names/shapes or kind do not fit the round


@dataclass(slots=True)
class Round:
    """One open round: who was asked, who answered, the running weighted mean."""

    model_id: str
    run_id: str
    number: int
    selected: frozenset[str]
    quorum: int
    shapes: Mapping[str, tuple[int, ...]]
    kind: UpdateKind
    mean: WeightedMean = field(default_factory=WeightedMean)
    reported: set[str] = field(default_factory=set)
    outcomes: Counter[OfferOutcome] = field(default_factory=Counter)
    losses: list[float] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return len(self.reported) >= self.quorum

    def judge(self, update: RoundUpdate) -> OfferOutcome:
        if update.model_id != self.model_id:
            return OfferOutcome.OTHER_MODEL
        if update.run_id != self.run_id:
            return OfferOutcome.OTHER_RUN
        if update.round < self.number:
            return OfferOutcome.LATE
        if update.round > self.number:
            return OfferOutcome.OTHER_ROUND
        if update.device_id not in self.selected:
            return OfferOutcome.NOT_SELECTED
        if update.device_id in self.reported:
            return OfferOutcome.DUPLICATE
        if update.kind is not self.kind or {
            k: tuple(v.shape) for k, v in update.tensors.items()
        } != dict(self.shapes):
            return OfferOutcome.MISMATCH
        return OfferOutcome.ACCEPTED

    def offer(self, update: RoundUpdate) -> OfferOutcome:
        """Judge ``update`` and, if accepted, add it to the mean."""
        outcome = self.judge(update)
        if outcome is OfferOutcome.ACCEPTED:
            self.mean.add(update.sample_count, update.tensors)
            self.reported.add(update.device_id)
            if update.loss is not None:
                self.losses.append(update.loss)
        self.outcomes[outcome] += 1
        return outcome

    def reject(self, outcome: OfferOutcome) -> None:
        self.outcomes[outcome] += 1


@dataclass(frozen=True, slots=True)
class RoundReport:
    round: int
    selected: int
    accepted: int
    samples: int
    closed_by: str  # "quorum" or "deadline"
    seconds: float
    ignored: dict[str, int]
    mean_loss: float | None
    broadcast_bytes: int


# --------------------------------------------------------------------------- the server


def floating_state(state: Mapping[str, Any]) -> Arrays:
    """The entries FedAvg exchanges: floating tensors, as float32 numpy (integer buffers
    such as BatchNorm's ``num_batches_tracked`` stay on each side). Always a copy: a
    torch state dict shares storage with its module."""
    out: Arrays = {}
    for name, value in state.items():
        array = np.asarray(value)
        if np.issubdtype(array.dtype, np.floating):
            out[name] = np.array(array, dtype=np.float32, order="C", copy=True)
    return out


class FedAvgServer(Service):
    """Runs FedAvg rounds for one model over the round and update topics."""

    def __init__(
        self,
        *,
        bootstrap: str,
        topics: Topics,
        model_id: str,
        backbone: Backbone,
        cut: Cut,
        num_classes: int,
        init_state: Mapping[str, Any],
        devices: Sequence[str],
        config: FedAvgConfig,
        run_id: str | None = None,
    ) -> None:
        if not devices or len(set(devices)) != len(devices):
            raise ConfigError("devices must be distinct and not empty")
        self.bootstrap = bootstrap
        self.topics = topics
        self.model_id = model_id
        self.backbone = backbone
        self.cut = cut
        self.num_classes = num_classes
        self.state = floating_state(init_state)
        if not self.state:
            raise ConfigError("the initial head has no floating tensors to train")
        self.devices = tuple(devices)
        self.config = config
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.reports: list[RoundReport] = []
        # Positioned at the end before the first broadcast: updates sent after it are ours.
        self._clients = Duplex(
            bootstrap=bootstrap, topic=topics.fedavg_updates, client_id="fedex-fedavg-server"
        )
        self._leftover: Counter[OfferOutcome] = Counter()

    async def start(self) -> None:
        await self._clients.start()

    async def stop(self) -> None:
        await self._clients.stop()

    def broadcast_for(self, round_no: int, selected: tuple[str, ...]) -> RoundBroadcast:
        cfg = self.config
        return RoundBroadcast(
            model_id=self.model_id,
            run_id=self.run_id,
            round=round_no,
            backbone=self.backbone,
            cut=self.cut,
            num_classes=self.num_classes,
            selected=selected,
            local_epochs=cfg.local_epochs,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            deadline_ms=int(time.time() * 1000 + cfg.deadline_s * 1000) if selected else 0,
            dtype=cfg.dtype,
            tensors=self.state,
        )

    async def _send(self, broadcast: RoundBroadcast) -> int:
        producer = self._clients.producer
        assert producer is not None, "start() the server first"
        value = codec.encode_round_broadcast(broadcast)
        await producer.send_and_wait(
            self.topics.fedavg_rounds, value, key=codec.encode_key(self.model_id)
        )
        return len(value)

    async def run_round(self, round_no: int) -> RoundReport:
        """Broadcast, collect until quorum or deadline, average, step."""
        assert self._clients.consumer is not None, "start() the server first"
        cfg = self.config
        started = time.monotonic()
        selected = select_devices(
            self.devices, cfg.fraction, round_no, seed=cfg.seed, minimum=cfg.min_selected
        )
        current = Round(
            model_id=self.model_id,
            run_id=self.run_id,
            number=round_no,
            selected=frozenset(selected),
            quorum=quorum_size(len(selected), cfg.quorum),
            shapes={k: tuple(v.shape) for k, v in self.state.items()},
            kind=cfg.kind,
        )
        size = await self._send(self.broadcast_for(round_no, selected))
        deadline = started + cfg.deadline_s
        while not current.complete:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for message in await self._clients.poll(int(min(remaining, 1.0) * 1000) + 1):
                try:
                    update = codec.decode_round_update(message.value)
                except codec.CodecError as exc:
                    log.warning("fedavg: ignoring an invalid update: %s", exc)
                    current.reject(OfferOutcome.INVALID)
                    continue
                current.offer(update)
        mean = current.mean.result()
        if mean:
            self.state = apply_step(self.state, mean, cfg.kind, cfg.server_lr)
        ignored = {
            o.value: n for o, n in current.outcomes.items() if o is not OfferOutcome.ACCEPTED
        }
        report = RoundReport(
            round=round_no,
            selected=len(selected),
            accepted=len(current.reported),
            samples=current.mean.weight,
            closed_by="quorum" if current.complete else "deadline",
            seconds=time.monotonic() - started,
            ignored=ignored,
            mean_loss=float(np.mean(current.losses)) if current.losses else None,
            broadcast_bytes=size,
        )
        self.reports.append(report)
        log.info(
            "fedavg %s round %d: %d/%d reported (%s), %d samples, ignored %s, %.2f s",
            self.run_id,
            round_no,
            report.accepted,
            report.selected,
            report.closed_by,
            report.samples,
            ignored or "none",
            report.seconds,
        )
        return report

    async def run(self, rounds: int | None = None) -> list[RoundReport]:
        """``rounds`` rounds (default the config's), then the final model (a broadcast that
        selects nobody). Cancel the task to stop early."""
        total = self.config.rounds if rounds is None else rounds
        first = len(self.reports)
        for round_no in range(first, first + total):
            await self.run_round(round_no)
        await self._send(self.broadcast_for(first + total, ()))
        return self.reports[first:]


# --------------------------------------------------------------------------- entry point


def load_init_state(path: Path) -> dict[str, npt.NDArray[Any]]:
    """The initial head from a safetensors file (e.g. ``pipeline.checkpoints`` bytes)."""
    from safetensors.numpy import load_file

    try:
        return dict(load_file(str(path)))
    except Exception as exc:
        raise ConfigError(f"cannot read the initial head {path}: {exc}") from exc


def read_devices(path: Path) -> list[str]:
    """One device id per line; blank lines and ``#`` comments are skipped."""
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lab.fedavg_server", description="FedAvg server")
    p.add_argument("--model", required=True, help="model id")
    p.add_argument("--backbone", default=Backbone.INCEPTION_RESNET_V1.value)
    p.add_argument("--cut", default=Cut.FREEZE6.value)
    p.add_argument("--num-classes", type=int, required=True)
    p.add_argument("--init", type=Path, required=True, help="initial head (safetensors)")
    p.add_argument("--devices-file", type=Path, required=True, help="one device id per line")
    p.add_argument("--run-id", default=None)
    defaults = FedAvgConfig()
    for name in ("rounds", "min_selected", "local_epochs", "batch_size", "seed"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    for name in ("fraction", "quorum", "deadline_s", "lr", "server_lr"):
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    p.add_argument("--dtype", default=defaults.dtype.value, choices=[d.value for d in FeatureDType])
    p.add_argument("-v", "--verbose", action="store_true")
    return p


async def _serve(args: argparse.Namespace) -> None:
    from pipeline.settings import Settings

    settings = Settings()
    config = FedAvgConfig(
        rounds=args.rounds,
        fraction=args.fraction,
        min_selected=args.min_selected,
        quorum=args.quorum,
        deadline_s=args.deadline_s,
        local_epochs=args.local_epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        server_lr=args.server_lr,
        dtype=FeatureDType(args.dtype),
        seed=args.seed,
    )
    server = FedAvgServer(
        bootstrap=settings.bootstrap,
        topics=Topics(settings.topic_prefix),
        model_id=args.model,
        backbone=Backbone(args.backbone),
        cut=Cut(args.cut),
        num_classes=args.num_classes,
        init_state=load_init_state(args.init),
        devices=read_devices(args.devices_file),
        config=config,
        run_id=args.run_id,
    )
    async with server:
        task = asyncio.create_task(server.run())
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task
    log.info("fedavg %s: %d rounds done", server.run_id, len(server.reports))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
