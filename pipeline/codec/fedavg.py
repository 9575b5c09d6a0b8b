"""FedAvg baseline (issue 5): round broadcasts (kind 6) and round updates (kind 7)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Final

import numpy as np

from pipeline.codec import fields
from pipeline.codec.envelope import EXPONENT_BITS, CodecError, Kind, Reject, align, frame, unframe
from pipeline.records import Backbone, Cut, FeatureDType, RoundBroadcast, RoundUpdate, UpdateKind

# ------------------------------------------------------------- FedAvg baseline (issue 5)
#
# Round broadcasts (server → devices) and round updates (device → server) carry a head's
# named tensors: the metadata lists ``[name, shape]`` in body order, the body is each
# tensor's raw little-endian bytes (row-major, ``dtype``), each padded to 8 bytes.

#: Most tensors one record may carry (a head has at most a few hundred).
MAX_TENSORS: Final = 4096
#: Most devices one round may select (the list rides in the metadata).
MAX_SELECTED: Final = 2048


def _tensor_body(
    tensors: Mapping[str, np.ndarray], dtype: FeatureDType
) -> tuple[list[Any], list[bytes]]:
    if not tensors:
        raise CodecError(Reject.MISSING_FIELD, "a FedAvg record needs at least one tensor")
    table: list[Any] = []
    parts: list[bytes] = []
    for name, array in tensors.items():
        raw = np.ascontiguousarray(array, dtype=dtype.numpy).tobytes()
        table.append([name, [int(d) for d in np.shape(array)]])
        parts += [raw, b"\0" * (align(len(raw)) - len(raw))]
    return table, parts


def _tensors_from(
    meta: Mapping[str, Any], body: memoryview, dtype: FeatureDType
) -> dict[str, np.ndarray]:
    """Read-only views of the body's tensors, checked against the metadata's table."""
    table = fields.get(meta, "tensors", list, "a list of [name, shape]")
    if not table or len(table) > MAX_TENSORS:
        raise CodecError(
            Reject.BAD_FIELD, f"a record carries 1 to {MAX_TENSORS} tensors, got {len(table)}"
        )
    tensors: dict[str, np.ndarray] = {}
    at = 0
    for item in table:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not isinstance(item[0], str)
            or not 0 < len(item[0]) <= 256
            or not isinstance(item[1], list)
            or len(item[1]) > 8
            or any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in item[1])
        ):
            raise CodecError(
                Reject.SHAPE_MISMATCH, f"tensor entry {item!r:.80} must be [name, [dims ≥ 0]]"
            )
        name, shape = item[0], tuple(item[1])
        if name in tensors:
            raise CodecError(Reject.BAD_FIELD, f"tensor {name!r} appears twice")
        count = math.prod(shape)
        size = count * dtype.numpy.itemsize
        if at + size > len(body):
            raise CodecError(
                Reject.SIZE_MISMATCH,
                f"body is {len(body)} bytes; tensor {name!r} {list(shape)} ends past it",
            )
        tensors[name] = np.frombuffer(body, dtype.numpy, count, at).reshape(shape)
        at += align(size)
    if at != len(body):
        raise CodecError(
            Reject.SIZE_MISMATCH, f"body is {len(body)} bytes, the tensor table needs {at}"
        )
    bits, exponent = EXPONENT_BITS[dtype]
    for name, array in tensors.items():
        if array.size and int((array.view(bits) & exponent).max()) == exponent:
            raise CodecError(Reject.NON_FINITE, f"tensor {name!r} holds NaN or Inf")
    return tensors


def _positive_int(meta: Mapping[str, Any], key: str) -> int:
    value = fields.nonneg_int(meta, key)
    if value == 0:
        raise CodecError(Reject.BAD_FIELD, f"{key!r} must be positive")
    return value


def encode_round_broadcast(broadcast: RoundBroadcast) -> bytes:
    """Encodes a round's global head (tensors cast to ``broadcast.dtype``)."""
    table, parts = _tensor_body(broadcast.tensors, broadcast.dtype)
    meta = {
        "model_id": broadcast.model_id,
        "run_id": broadcast.run_id,
        "round": broadcast.round,
        "backbone": broadcast.backbone.value,
        "cut": broadcast.cut.value,
        "num_classes": broadcast.num_classes,
        "selected": list(broadcast.selected),
        "local_epochs": broadcast.local_epochs,
        "batch_size": broadcast.batch_size,
        "lr": broadcast.lr,
        "deadline_ms": broadcast.deadline_ms,
        "dtype": broadcast.dtype.value,
        "tensors": table,
        "created_at_ms": broadcast.created_at_ms,
    }
    return frame(Kind.ROUND_BROADCAST, meta, parts)


def decode_round_broadcast(data: bytes | bytearray | memoryview) -> RoundBroadcast:
    """Decodes and validates a broadcast; tensors are read-only views into ``data``."""
    _, meta, body = unframe(data, Kind.ROUND_BROADCAST)
    raw_selected = fields.get(meta, "selected", list, "a list of device ids")
    if len(raw_selected) > MAX_SELECTED:
        raise CodecError(
            Reject.BAD_FIELD, f"{len(raw_selected)} devices selected, the limit is {MAX_SELECTED}"
        )
    selected = tuple(fields.ident({"device_id": d}, "device_id") for d in raw_selected)
    if len(set(selected)) != len(selected):
        raise CodecError(Reject.BAD_FIELD, "a device is selected twice")
    lr = fields.get(meta, "lr", (int, float), "a number")
    if not math.isfinite(lr) or lr < 0:
        raise CodecError(Reject.BAD_FIELD, f"'lr' must be finite and ≥ 0, got {lr}")
    dtype: FeatureDType = fields.choice(meta, "dtype", FeatureDType, Reject.UNKNOWN_DTYPE)
    return RoundBroadcast(
        model_id=fields.ident(meta, "model_id"),
        run_id=fields.ident(meta, "run_id"),
        round=fields.nonneg_int(meta, "round"),
        backbone=fields.choice(meta, "backbone", Backbone, Reject.UNKNOWN_BACKBONE),
        cut=fields.choice(meta, "cut", Cut, Reject.UNKNOWN_CUT),
        num_classes=_positive_int(meta, "num_classes"),
        selected=selected,
        local_epochs=fields.nonneg_int(meta, "local_epochs"),
        batch_size=_positive_int(meta, "batch_size"),
        lr=float(lr),
        deadline_ms=fields.nonneg_int(meta, "deadline_ms"),
        dtype=dtype,
        tensors=_tensors_from(meta, body, dtype),
        created_at_ms=fields.nonneg_int(meta, "created_at_ms"),
    )


def encode_round_update(update: RoundUpdate) -> bytes:
    """Encodes a device's round update (tensors cast to ``update.dtype``)."""
    if update.loss is not None and not math.isfinite(update.loss):
        raise CodecError(Reject.NON_FINITE, f"loss {update.loss} is not finite")
    table, parts = _tensor_body(update.tensors, update.dtype)
    meta = {
        "model_id": update.model_id,
        "run_id": update.run_id,
        "round": update.round,
        "device_id": update.device_id,
        "sample_count": update.sample_count,
        "kind": update.kind.value,
        "dtype": update.dtype.value,
        "loss": update.loss,
        "tensors": table,
        "created_at_ms": update.created_at_ms,
    }
    return frame(Kind.ROUND_UPDATE, meta, parts)


def decode_round_update(data: bytes | bytearray | memoryview) -> RoundUpdate:
    """Decodes and validates a round update; tensors are read-only views into ``data``.
    Whether its tensors fit the round's head is the server's check."""
    _, meta, body = unframe(data, Kind.ROUND_UPDATE)
    loss = fields.optional(meta, "loss", (int, float), "a number")
    if loss is not None and not math.isfinite(loss):
        raise CodecError(Reject.NON_FINITE, f"loss {loss} is not finite")
    dtype: FeatureDType = fields.choice(meta, "dtype", FeatureDType, Reject.UNKNOWN_DTYPE)
    return RoundUpdate(
        model_id=fields.ident(meta, "model_id"),
        run_id=fields.ident(meta, "run_id"),
        round=fields.nonneg_int(meta, "round"),
        device_id=fields.ident(meta, "device_id"),
        sample_count=_positive_int(meta, "sample_count"),
        kind=fields.choice(meta, "kind", UpdateKind, Reject.BAD_FIELD),
        dtype=dtype,
        tensors=_tensors_from(meta, body, dtype),
        loss=fields.float_or_none(loss),
        created_at_ms=fields.nonneg_int(meta, "created_at_ms"),
    )
