"""The pure half of the fleet's subscription side: what a model version is worth to the
devices of one process, and whether it may be used at all.

**Held-out accuracy for thousands of devices at the cost of one forward pass.** A
device's evaluation set is every held-out bank row of its vendor's camera and its user's
identities (:meth:`device_sim.bank.FeatureBank.held_out`). Devices that share a
(vendor, identity) *cell* share those rows, and a fleet of 10,000 devices over 4 vendors
and 32 identities has at most 128 cells. :class:`HeldOutSet` therefore evaluates each
held-out row of the cells in use once per model version and derives every device's
accuracy from per-cell counts (correct / total over the cells of the device, vectorised
with ``bincount``): the cost of a version is one forward pass over the model's held-out
rows, whatever the number of devices.

**Versions.** :func:`verify_blob` and :func:`load_checkpoint` accept a checkpoint or
raise :class:`Refused` with a machine-readable :class:`RefusalReason`; a version ends as a
:class:`VersionEvent` (measured on every device) or a :class:`RefusedVersion`.

**Fleet helpers.** :func:`activation_times` / :func:`fanout_seconds` (per-device
activation with simulated transfer time) and :class:`TriggerIndex` / :func:`covers_offset`
(which version includes a push: freshness).

No I/O; the head's forward pass runs in whatever thread calls
:meth:`HeldOutSet.evaluate` (:class:`device_sim.subscription.ModelSubscriber` uses a
worker thread).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn

from device_sim.bank import BankError, FeatureBank
from pipeline.checkpoints import CheckpointError, decode_checkpoint, sha256_hex
from pipeline.errors import FedexError
from pipeline.records import ModelUpdate, OffsetRange, TrainingTrigger

#: Rows per forward call: bounds the activation memory of deep heads.
EVAL_BATCH = 4096


@dataclass(frozen=True, eq=False)
class HeldOutSet:
    """The held-out evaluation data of one model for the devices of one process.

    ``features``/``labels`` are the distinct held-out rows (``bank_rows`` of the bank) of
    the (vendor, identity) cells some device uses; ``row_cell`` maps each row to its cell;
    ``device_cells`` (CSR with ``device_ptr``) lists each device's cells, in the order given to
    :meth:`for_devices`. ``cell_total`` and ``device_total`` count held-out rows.
    """

    model_id: str
    backbone: str
    cut: str
    num_classes: int
    bank_rows: npt.NDArray[np.int64]
    features: npt.NDArray[np.float32]
    labels: npt.NDArray[np.int64]
    row_cell: npt.NDArray[np.int64]
    cell_total: npt.NDArray[np.int64]
    device_ptr: npt.NDArray[np.int64]
    device_cells: npt.NDArray[np.int64]
    device_total: npt.NDArray[np.int64]

    @classmethod
    def for_devices(
        cls,
        bank: FeatureBank,
        model_id: str,
        vendors: npt.ArrayLike,
        identities: Sequence[npt.ArrayLike],
    ) -> HeldOutSet:
        """Device ``k`` photographs ``identities[k]`` through camera ``vendors[k]``.

        Duplicate identities of a device count once (as in ``bank.held_out``). Vectorised:
        building it for 10,000 devices takes milliseconds.
        """
        vend = np.asarray(vendors, dtype=np.int64).ravel()
        sets = [np.asarray(s, dtype=np.int64).ravel() for s in identities]
        if len(sets) != vend.shape[0]:
            raise BankError(f"{vend.shape[0]} vendors but {len(sets)} identity sets")
        classes = bank.num_classes
        if ((vend < 0) | (vend >= bank.num_domains)).any():
            raise BankError(f"vendor out of range [0, {bank.num_domains})")
        sizes = np.asarray([s.size for s in sets], dtype=np.int64)
        flat = np.concatenate(sets) if sets else np.zeros(0, dtype=np.int64)
        if ((flat < 0) | (flat >= classes)).any():
            raise BankError(f"identity out of range [0, {classes})")
        n = vend.shape[0]
        # (device, cell) pairs, deduplicated and sorted by device then cell.
        device_of = np.repeat(np.arange(n, dtype=np.int64), sizes)
        global_cell = np.repeat(vend, sizes) * classes + flat
        pairs = np.unique(device_of * (bank.num_domains * classes) + global_cell)
        pair_device = pairs // (bank.num_domains * classes)
        pair_cell = pairs % (bank.num_domains * classes)
        used, local_cell = np.unique(pair_cell, return_inverse=True)

        rows = bank.select(model_id, holdout=True)
        row_global = bank.domains[rows].astype(np.int64) * classes + bank.labels[rows]
        keep = np.isin(row_global, used)
        rows, row_global = rows[keep], row_global[keep]
        row_cell = np.searchsorted(used, row_global).astype(np.int64)
        cell_total = np.bincount(row_cell, minlength=used.size).astype(np.int64)
        device_cells = local_cell.astype(np.int64).ravel()
        device_ptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(pair_device, minlength=n), out=device_ptr[1:])
        device_total = np.bincount(
            pair_device, weights=cell_total[device_cells], minlength=n
        ).astype(np.int64)
        features, labels = bank.take(rows)
        return cls(
            model_id=model_id,
            backbone=str(bank.backbone),
            cut=str(bank.cut),
            num_classes=classes,
            bank_rows=rows,
            features=np.ascontiguousarray(features, dtype=np.float32),
            labels=labels.astype(np.int64),
            row_cell=row_cell,
            cell_total=cell_total,
            device_ptr=device_ptr,
            device_cells=device_cells,
            device_total=device_total,
        )

    @property
    def devices(self) -> int:
        return int(self.device_ptr.shape[0] - 1)

    @property
    def rows(self) -> int:
        """Held-out rows one evaluation runs through the head."""
        return int(self.labels.shape[0])

    @property
    def cells(self) -> int:
        return int(self.cell_total.shape[0])

    @torch.no_grad()
    def predict(self, head: nn.Module) -> npt.NDArray[np.int64]:
        """The head's top-1 class of every held-out row (eval mode, batched)."""
        head.eval()
        x = torch.from_numpy(self.features)
        if x.shape[0] == 0:
            return np.zeros(0, dtype=np.int64)
        parts = [head(x[i : i + EVAL_BATCH]).argmax(1) for i in range(0, len(x), EVAL_BATCH)]
        return torch.cat(parts).numpy().astype(np.int64)

    def device_accuracy(self, predicted: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """Per-device accuracy (float32, NaN where a device has no held-out rows) from the
        predictions of every row: pure numpy, no head."""
        pred = np.asarray(predicted).ravel()
        if pred.shape[0] != self.rows:
            raise BankError(f"{pred.shape[0]} predictions for {self.rows} held-out rows")
        correct = (pred == self.labels).astype(np.float64)
        cell_correct = np.bincount(self.row_cell, weights=correct, minlength=self.cells)
        device_of = np.repeat(np.arange(self.devices), np.diff(self.device_ptr))
        device_correct = np.bincount(
            device_of, weights=cell_correct[self.device_cells], minlength=self.devices
        )
        with np.errstate(invalid="ignore", divide="ignore"):
            accuracy = device_correct / self.device_total
        return np.where(self.device_total > 0, accuracy, np.nan).astype(np.float32)

    def evaluate(self, head: nn.Module) -> npt.NDArray[np.float32]:
        """Per-device accuracy of ``head``: one batched forward pass over :attr:`rows`."""
        return self.device_accuracy(self.predict(head))


def mean_accuracy(accuracy: npt.NDArray[np.floating]) -> float:
    """Mean over the devices that have held-out rows (NaN if none has)."""
    finite = accuracy[np.isfinite(accuracy)]
    return float(finite.mean()) if finite.size else float("nan")


# --------------------------------------------------------------------------- versions


class RefusalReason(enum.StrEnum):
    """Why a version was refused (machine-readable; devices keep their head)."""

    SHA256_MISMATCH = "sha256_mismatch"
    DOWNLOAD_FAILED = "download_failed"
    DECODE_FAILED = "decode_failed"
    INCOMPATIBLE = "incompatible"  # another backbone, cut or number of classes
    SHAPE_MISMATCH = "shape_mismatch"  # the tensors do not fit the head


class Refused(FedexError):
    """A version cannot be used, with its :class:`RefusalReason`."""

    def __init__(self, reason: RefusalReason, message: str) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason
        self.message = message


@dataclass(frozen=True, eq=False)
class VersionEvent:
    """A version verified, loaded and measured on every device of the process.

    ``accuracy`` is per device, in the order given to the model's :class:`HeldOutSet`
    (NaN where a device has no held-out rows); ``mean_accuracy`` its mean over devices.
    ``produced_at`` is the update's Kafka record timestamp, ``received_at`` when this
    process read it, ``ready_at`` when the blob was verified and evaluated (all Unix
    seconds). ``activated``: devices now run this head (see the module docstring).
    ``source`` is ``inline`` or ``http``; ``eval_seconds`` the worker thread's time to
    verify, decode, load and evaluate it. ``state_dict`` is the decoded checkpoint (one per
    process, shared by its devices). ``update`` is the record it came in, without its inline
    checkpoint; the version's identity (model, version, lineage, size) is read from it.
    """

    activated: bool
    replayed: bool
    update: ModelUpdate
    source: str
    accuracy: npt.NDArray[np.float32]
    mean_accuracy: float
    produced_at: float
    received_at: float
    ready_at: float
    eval_seconds: float
    covers: tuple[OffsetRange, ...]
    state_dict: Mapping[str, Tensor]

    @property
    def model_id(self) -> str:
        return self.update.model_id

    @property
    def version(self) -> str:
        return self.update.version

    @property
    def parent_version(self) -> str | None:
        return self.update.parent_version

    @property
    def trigger_id(self) -> str | None:
        return self.update.trigger_id

    @property
    def is_best(self) -> bool:
        return self.update.is_best

    @property
    def size_bytes(self) -> int:
        return self.update.size


@dataclass(frozen=True)
class RefusedVersion:
    """A version this process refused; its devices keep the head they run."""

    model_id: str
    version: str
    reason: RefusalReason
    message: str
    produced_at: float
    is_best: bool

    @classmethod
    def of(cls, update: ModelUpdate, refusal: Refused, produced_at: float) -> RefusedVersion:
        """The refusal of ``update`` (produced at ``produced_at``) for ``refusal``'s reason."""
        return cls(
            update.model_id,
            update.version,
            refusal.reason,
            refusal.message,
            produced_at=produced_at,
            is_best=update.is_best,
        )

    def as_row(self) -> dict[str, str]:
        """The row a fleet's summary lists under ``refused`` (JSON-ready)."""
        return {
            "model_id": self.model_id,
            "version": self.version,
            "reason": str(self.reason),
            "message": self.message,
        }


# --------------------------------------------------------------------------- helpers


class TriggerIndex:
    """trigger id → the feature-log ranges it covered (pure fold of the triggers topic;
    a re-fired trigger keeps its id and ranges, the last one wins)."""

    def __init__(self) -> None:
        self._ranges: dict[str, tuple[OffsetRange, ...]] = {}

    def add(self, trigger: TrainingTrigger) -> None:
        self._ranges[trigger.trigger_id] = trigger.ranges

    def covers(self, trigger_id: str | None) -> tuple[OffsetRange, ...] | None:
        """The ranges of ``trigger_id``; None if it is not (yet) known."""
        return None if trigger_id is None else self._ranges.get(trigger_id)

    def __len__(self) -> int:
        return len(self._ranges)


def covers_offset(covers: Sequence[OffsetRange], partition: int, offset: int) -> bool:
    """Whether a feature-log record at ``partition``/``offset`` lies in ``covers``."""
    return any(r.partition == partition and r.start <= offset < r.end for r in covers)


def activation_times(
    ready_at: float, transfer_s: npt.ArrayLike | None = None, devices: int | None = None
) -> npt.NDArray[np.float64]:
    """When each device runs the new head: ``ready_at`` plus its simulated download
    seconds (e.g. ``device_sim.network.transfer_seconds(event.size_bytes, ...)``). With
    transfer time off (``transfer_s=None``) every one of ``devices`` activates at
    ``ready_at``."""
    if transfer_s is None:
        if devices is None:
            raise ValueError("pass transfer_s, or devices when transfer time is off")
        return np.full(devices, ready_at, dtype=np.float64)
    transfer = np.asarray(transfer_s, dtype=np.float64)
    if (transfer < 0).any():
        raise ValueError("transfer seconds must be ≥ 0")
    return ready_at + transfer


def fanout_seconds(
    produced_at: float, activation_at: npt.ArrayLike, quantile: float = 0.99
) -> float:
    """Seconds from ``produced_at`` until ``quantile`` of the devices run the new head."""
    times = np.asarray(activation_at, dtype=np.float64)
    if times.size == 0:
        return float("nan")
    return float(np.quantile(times, quantile, method="higher")) - produced_at


def verify_blob(update: ModelUpdate, blob: bytes) -> None:
    """Raises :class:`Refused` (``sha256_mismatch``) unless ``blob`` is the announced one."""
    actual = sha256_hex(blob)
    if actual != update.sha256:
        raise Refused(
            RefusalReason.SHA256_MISMATCH,
            f"checkpoint {update.model_id}/{update.version} hashes to {actual}, the update "
            f"announced {update.sha256}: corrupted or tampered with; not loaded",
        )


def load_checkpoint(
    head: nn.Module, held_out: HeldOutSet, update: ModelUpdate, blob: bytes
) -> dict[str, Tensor]:
    """Decode a verified blob and load it into ``head`` (the model's head template).
    Raises :class:`Refused` without touching ``head`` if it does not fit."""
    from pipeline.zoo import ZooError, load_head_state

    want = (held_out.backbone, held_out.cut, held_out.num_classes)
    got = (str(update.backbone), str(update.cut), update.num_classes)
    if got != want:
        raise Refused(
            RefusalReason.INCOMPATIBLE,
            f"{update.model_id}/{update.version} is {got}, the devices run {want}",
        )
    try:
        state, _ = decode_checkpoint(blob)
    except CheckpointError as exc:
        raise Refused(RefusalReason.DECODE_FAILED, str(exc)) from None
    try:
        load_head_state(head, state)
    except ZooError as exc:
        raise Refused(RefusalReason.SHAPE_MISMATCH, str(exc)) from None
    return state
