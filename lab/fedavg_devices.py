"""The FedAvg baseline's devices: local training on their own samples, every round.

The comparison FedEx is measured against (issue 5; the server is ``lab.fedavg_server``). A
device selected in a round's broadcast loads the global head, runs ``E`` local epochs of
plain minibatch SGD on its samples (classic FedAvg; ``E = 0`` computes one full-batch
gradient instead, FedSGD) and pushes ``local - global`` (or the gradient) with its sample
count on the update topic. The samples are exactly what the same device would push to FedEx.

:func:`local_update` is pure torch; :class:`FedAvgFleet` is the I/O shell that hosts many
devices in one process and keeps, per device, the real bytes it pulled and pushed (encoded
message sizes) and the seconds its local training took (torch on this CPU).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from device_sim.images import rng_for, stable_key
from pipeline import codec
from pipeline.duplex import Duplex
from pipeline.errors import FedexError
from pipeline.head_loop import CPU, Schedule, as_tensor, train_epochs, trainable_parameters
from pipeline.lifecycle import Service
from pipeline.records import FeatureDType, RoundBroadcast, RoundUpdate, UpdateKind
from pipeline.topics import Topics
from pipeline.zoo import build_backbone, head_state_dict, load_head_state, split

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

Arrays = dict[str, npt.NDArray[np.float32]]


class FedAvgDeviceError(FedexError):
    """A round could not be run on the devices; the message says why."""


# --------------------------------------------------------------------------- local training


@dataclass(frozen=True, slots=True)
class LocalResult:
    tensors: Arrays
    kind: UpdateKind
    loss: float
    seconds: float


def load_global(
    head: nn.Module, template: Mapping[str, torch.Tensor], tensors: Mapping[str, npt.ArrayLike]
) -> None:
    """Load a broadcast's tensors over ``template`` (the head's own state: entries the
    broadcast does not carry, e.g. integer buffers, keep their template values)."""
    state = dict(template)
    for name, value in tensors.items():
        state[name] = torch.from_numpy(np.array(value, dtype=np.float32))
    load_head_state(head, state)


def local_update(
    head: nn.Module,
    features: npt.ArrayLike,
    labels: npt.ArrayLike,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> LocalResult:
    """Train ``head`` (already holding the global weights) in place and return what the
    device pushes: the change of its floating state entries after ``epochs`` of SGD on
    shuffled minibatches, or, with ``epochs = 0``, the full-batch loss gradient. ``loss``
    is the mean training loss of the last epoch (of the gradient pass)."""
    started = time.perf_counter()
    x = as_tensor(features, CPU, torch.float32)
    y = as_tensor(labels, CPU, torch.long)
    n = int(x.shape[0])
    if n == 0 or int(y.shape[0]) != n:
        raise FedAvgDeviceError(f"need samples and one label each, got {n} and {y.shape[0]}")
    before = {k: v.detach().clone() for k, v in head.state_dict().items() if v.is_floating_point()}
    if epochs == 0:
        tensors, loss = _full_batch_gradient(head, x, y, before)
        return LocalResult(tensors, UpdateKind.GRADIENT, loss, time.perf_counter() - started)
    optimizer = torch.optim.SGD(trainable_parameters(head), lr=lr)
    schedule = Schedule.plain(epochs, batch_size, seed)
    *_, last = train_epochs(head, optimizer, x, y, schedule)
    after = head.state_dict()
    delta = {k: (after[k].detach() - v).numpy().astype(np.float32) for k, v in before.items()}
    return LocalResult(delta, UpdateKind.DELTA, last, time.perf_counter() - started)


def _full_batch_gradient(
    head: nn.Module, x: torch.Tensor, y: torch.Tensor, entries: Mapping[str, torch.Tensor]
) -> tuple[Arrays, float]:
    """FedSGD: the loss gradient of each of ``entries`` over the whole set (zeros for
    entries that are not parameters or have none), and the loss; the head ends in eval
    mode, unstepped."""
    head.train()
    head.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(head(x), y)
    loss.backward()
    named = dict(head.named_parameters())
    tensors: Arrays = {}
    for name, value in entries.items():
        grad = named[name].grad if name in named else None
        tensors[name] = (grad if grad is not None else torch.zeros_like(value)).numpy().copy()
    head.eval()
    return tensors, float(loss.detach())


# --------------------------------------------------------------------------- the fleet


@dataclass(frozen=True, slots=True)
class DeviceData:
    """A device's local training samples (the same rows it would push to FedEx)."""

    features: npt.NDArray[np.floating]
    labels: npt.NDArray[np.int32]


@dataclass(slots=True)
class DeviceLedger:
    """What one device spent: real encoded bytes, local training seconds, rounds."""

    bytes_up: int = 0
    bytes_down: int = 0
    compute_seconds: float = 0.0
    rounds: int = 0


#: Called with every broadcast of the run and its arrival time, before any device trains
#: on it; returning True ends the fleet's run there (e.g. the target accuracy is reached).
OnBroadcast = Callable[[RoundBroadcast, int], Awaitable[bool]]


class FedAvgFleet(Service):
    """Hosts FedAvg devices of one model in this process.

    Follows the round topic from its end at ``start()``; for each broadcast of ``model_id``
    (of the first run seen, or ``run_id``), the selected devices it hosts pull it, train
    locally one after another in a worker thread, and push their updates.
    """

    def __init__(
        self,
        *,
        bootstrap: str,
        topics: Topics,
        model_id: str,
        devices: Mapping[str, DeviceData],
        dtype: FeatureDType = FeatureDType.FLOAT32,
        run_id: str | None = None,
        seed: int = 0,
    ) -> None:
        self.bootstrap = bootstrap
        self.topics = topics
        self.model_id = model_id
        self.devices = dict(devices)
        self.dtype = dtype
        self.run_id = run_id
        self.seed = seed
        self.ledgers = {d: DeviceLedger() for d in self.devices}
        self.rounds_seen: list[int] = []
        self._clients = Duplex(
            bootstrap=bootstrap, topic=topics.fedavg_rounds, client_id="fedex-fedavg-devices"
        )
        self._head: nn.Module | None = None
        self._template: dict[str, torch.Tensor] = {}

    async def start(self) -> None:
        await self._clients.start()

    async def stop(self) -> None:
        await self._clients.stop()

    def _head_for(self, broadcast: RoundBroadcast) -> nn.Module:
        if self._head is None:
            model = build_backbone(broadcast.backbone, num_classes=broadcast.num_classes)
            self._head = split(model, broadcast.backbone, broadcast.cut).head
            self._template = {k: v.clone() for k, v in head_state_dict(self._head).items()}
        return self._head

    def _train(self, broadcast: RoundBroadcast, mine: list[str]) -> list[tuple[str, LocalResult]]:
        head = self._head_for(broadcast)
        results = []
        for device_id in mine:
            data = self.devices[device_id]
            load_global(head, self._template, broadcast.tensors)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed + broadcast.round)  # dropout in deeper heads
                result = local_update(
                    head,
                    data.features,
                    data.labels,
                    epochs=broadcast.local_epochs,
                    batch_size=broadcast.batch_size,
                    lr=broadcast.lr,
                    seed=int(
                        rng_for(self.seed, broadcast.round, stable_key(device_id)).integers(2**31)
                    ),
                )
            results.append((device_id, result))
        return results

    async def handle(self, broadcast: RoundBroadcast, size: int) -> int:
        """Run one round on the hosted selected devices; returns how many pushed."""
        producer = self._clients.producer
        assert producer is not None, "start() the fleet first"
        mine = [d for d in broadcast.selected if d in self.devices]
        if not mine:
            return 0
        results = await asyncio.to_thread(self._train, broadcast, mine)
        sends = []
        for device_id, result in results:
            ledger = self.ledgers[device_id]
            ledger.bytes_down += size
            ledger.compute_seconds += result.seconds
            ledger.rounds += 1
            value = codec.encode_round_update(
                RoundUpdate(
                    model_id=self.model_id,
                    run_id=broadcast.run_id,
                    round=broadcast.round,
                    device_id=device_id,
                    sample_count=int(self.devices[device_id].labels.shape[0]),
                    kind=result.kind,
                    dtype=self.dtype,
                    tensors=result.tensors,
                    loss=result.loss,
                )
            )
            ledger.bytes_up += len(value)
            sends.append(
                await producer.send(
                    self.topics.fedavg_updates, value, key=codec.encode_key(self.model_id)
                )
            )
        await asyncio.gather(*sends)
        return len(results)

    async def run(
        self,
        *,
        on_broadcast: OnBroadcast | None = None,
        idle_timeout: float | None = None,
    ) -> RoundBroadcast | None:
        """Serve rounds until the final broadcast (nobody selected), ``on_broadcast`` says
        stop, or ``idle_timeout`` seconds pass without a broadcast. Returns the last
        broadcast seen (None if none came)."""
        assert self._clients.consumer is not None, "start() the fleet first"
        last: RoundBroadcast | None = None
        idle_since = time.monotonic()
        while True:
            if idle_timeout is not None and time.monotonic() - idle_since > idle_timeout:
                return last
            for message in await self._clients.poll(timeout_ms=500):
                try:
                    broadcast = codec.decode_round_broadcast(message.value)
                except codec.CodecError as exc:
                    log.warning("fedavg devices: ignoring an invalid broadcast: %s", exc)
                    continue
                if broadcast.model_id != self.model_id:
                    continue
                if self.run_id is None:
                    self.run_id = broadcast.run_id
                if broadcast.run_id != self.run_id:
                    continue
                idle_since = time.monotonic()
                last = broadcast
                self.rounds_seen.append(broadcast.round)
                if on_broadcast is not None and await on_broadcast(broadcast, len(message.value)):
                    return broadcast
                if not broadcast.selected:
                    return broadcast
                await self.handle(broadcast, len(message.value))
