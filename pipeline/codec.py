"""The one wire codec: records ↔ bytes. No other module knows the byte layout.

Every message is an envelope: a 16-byte little-endian header, orjson metadata padded to
8 bytes, then a body. A feature push's body is columnar (sample ids, timestamps, labels,
then the raw feature tensor) so decoding is a handful of ``np.frombuffer`` views over the
message bytes, with no copy. ``docs/wire-format.md`` documents the layout byte by byte for
clients in other languages.

Decoding never trusts its input: anything wrong raises :class:`CodecError` with a
machine-readable :class:`Reject` reason and a message a person understands, and arbitrary
bytes raise nothing else.
"""

from __future__ import annotations

import base64
import binascii
import enum
import math
import re
import struct
from collections.abc import Mapping
from typing import Any, Final

import numpy as np
import orjson

from pipeline.errors import FedexError
from pipeline.records import (
    FEATURE_SHAPES,
    Backbone,
    BatchSummary,
    Cut,
    DeadLetter,
    FeatureDType,
    FeaturePush,
    ModelMetrics,
    ModelUpdate,
    OffsetRange,
    RoundBroadcast,
    RoundUpdate,
    TrainingTrigger,
    TriggerReason,
    UpdateKind,
)

MAGIC: Final = b"FDXS"
VERSION: Final = 1
HEADER: Final = struct.Struct("<4sBBHII")  # magic, version, kind, flags, meta_len, body_len
HEADER_SIZE: Final = HEADER.size  # 16
ALIGN: Final = 8

#: Defaults for decode_push; the agents pass the deployment's settings.
DEFAULT_MAX_SAMPLES: Final = 1024
MAX_META_BYTES: Final = 64 * 1024

_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
_SHA256_PATTERN: Final = re.compile(r"[0-9a-f]{64}")

_EXPONENT_BITS: Final[dict[FeatureDType, tuple[np.dtype[np.unsignedinteger], int]]] = {
    FeatureDType.FLOAT16: (np.dtype("<u2"), 0x7C00),
    FeatureDType.FLOAT32: (np.dtype("<u4"), 0x7F800000),
}

_U64 = np.dtype("<u8")
_I64 = np.dtype("<i8")
_I32 = np.dtype("<i4")


class Kind(enum.IntEnum):
    """Record kind, byte 5 of the header."""

    FEATURE_PUSH = 1
    TRAINING_TRIGGER = 2
    MODEL_UPDATE = 3
    DEAD_LETTER = 4
    #: Internal to the aggregation agents (ingest stage → Faust agent).
    BATCH_SUMMARY = 5
    #: FedAvg baseline (issue 5): server → devices, device → server.
    ROUND_BROADCAST = 6
    ROUND_UPDATE = 7


class Reject(enum.StrEnum):
    """Why a message was rejected. Stable strings: dead letters and HTTP 400s carry them."""

    TRUNCATED = "truncated"
    BAD_MAGIC = "bad_magic"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_KIND = "unknown_kind"
    WRONG_KIND = "wrong_kind"
    BAD_FLAGS = "bad_flags"
    SIZE_MISMATCH = "size_mismatch"
    BAD_METADATA = "bad_metadata"
    MISSING_FIELD = "missing_field"
    BAD_FIELD = "bad_field"
    MISSING_ID = "missing_id"
    BAD_ID = "bad_id"
    UNKNOWN_CUT = "unknown_cut"
    UNKNOWN_BACKBONE = "unknown_backbone"
    UNKNOWN_DTYPE = "unknown_dtype"
    SHAPE_MISMATCH = "shape_mismatch"
    EMPTY_BATCH = "empty_batch"
    OVERSIZED_BATCH = "oversized_batch"
    NON_FINITE = "non_finite"
    LABEL_OUT_OF_RANGE = "label_out_of_range"
    DUPLICATE_SAMPLE_ID = "duplicate_sample_id"
    # Raised by the agents, which know the registry (the codec alone cannot tell).
    UNKNOWN_MODEL = "unknown_model"
    MODEL_MISMATCH = "model_mismatch"


class CodecError(FedexError):
    """A message could not be encoded or decoded. ``reason`` is machine-readable."""

    def __init__(self, reason: Reject, message: str) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason
        self.message = message


# ---------------------------------------------------------------------------- envelope


def _align(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


def _envelope(kind: Kind, meta: Mapping[str, Any], body_parts: list[bytes] | None = None) -> bytes:
    meta_bytes = orjson.dumps(meta)
    if len(meta_bytes) > MAX_META_BYTES:
        raise CodecError(
            Reject.BAD_METADATA, f"metadata is {len(meta_bytes)} bytes, over {MAX_META_BYTES}"
        )
    parts = body_parts or []
    body_len = sum(len(p) for p in parts)
    pad = _align(HEADER_SIZE + len(meta_bytes)) - HEADER_SIZE - len(meta_bytes)
    header = HEADER.pack(MAGIC, VERSION, kind, 0, len(meta_bytes), body_len)
    return b"".join([header, meta_bytes, b"\0" * pad, *parts])


def _open(
    data: bytes | bytearray | memoryview, expected: Kind | None
) -> tuple[Kind, dict[str, Any], memoryview]:
    """Checks the header and returns (kind, metadata, body view)."""
    view = memoryview(data)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    if len(view) < HEADER_SIZE:
        raise CodecError(
            Reject.TRUNCATED,
            f"message is {len(view)} bytes, shorter than the {HEADER_SIZE}-byte header",
        )
    magic, version, kind_byte, flags, meta_len, body_len = HEADER.unpack_from(view, 0)
    if magic != MAGIC:
        raise CodecError(
            Reject.BAD_MAGIC,
            f"starts with {bytes(magic)!r}, expected {MAGIC!r}: not a FedEx record",
        )
    if version != VERSION:
        raise CodecError(
            Reject.UNSUPPORTED_VERSION,
            f"wire version {version} is not supported (this codec reads version {VERSION})",
        )
    try:
        kind = Kind(kind_byte)
    except ValueError:
        raise CodecError(Reject.UNKNOWN_KIND, f"record kind {kind_byte} is unknown") from None
    if expected is not None and kind is not expected:
        raise CodecError(
            Reject.WRONG_KIND, f"expected a {expected.name.lower()}, got a {kind.name.lower()}"
        )
    if flags != 0:
        raise CodecError(
            Reject.BAD_FLAGS, f"flags must be 0 in version {VERSION}, got {flags:#06x}"
        )
    if meta_len > MAX_META_BYTES:
        raise CodecError(
            Reject.BAD_METADATA, f"metadata length {meta_len} is over {MAX_META_BYTES}"
        )
    body_at = _align(HEADER_SIZE + meta_len)
    end = body_at + body_len
    if len(view) < end:
        raise CodecError(
            Reject.TRUNCATED,
            f"header declares {end} bytes (metadata {meta_len}, body {body_len}), "
            f"message has {len(view)}",
        )
    if len(view) > end:
        raise CodecError(
            Reject.SIZE_MISMATCH, f"{len(view) - end} trailing bytes after the declared body"
        )
    try:
        meta = orjson.loads(view[HEADER_SIZE : HEADER_SIZE + meta_len])
    except orjson.JSONDecodeError as exc:
        raise CodecError(Reject.BAD_METADATA, f"metadata is not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise CodecError(
            Reject.BAD_METADATA, f"metadata must be a JSON object, got {type(meta).__name__}"
        )
    return kind, meta, view[body_at:end]


def peek_kind(data: bytes | bytearray | memoryview) -> Kind:
    """The kind of a record, checking only the header."""
    return _open(data, None)[0]


# ------------------------------------------------------------------- metadata access


def _get(meta: Mapping[str, Any], key: str, types: type | tuple[type, ...], what: str) -> Any:
    if key not in meta or meta[key] is None:
        raise CodecError(Reject.MISSING_FIELD, f"metadata has no {key!r} ({what})")
    value = meta[key]
    # bool is an int in Python; a JSON true is never a valid count or offset.
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        raise CodecError(Reject.BAD_FIELD, f"{key!r} must be {what}, got {value!r:.80}")
    return value


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _optional(meta: Mapping[str, Any], key: str, types: type | tuple[type, ...], what: str) -> Any:
    if meta.get(key) is None:
        return None
    return _get(meta, key, types, what)


def _id(meta: Mapping[str, Any], key: str) -> str:
    value = meta.get(key)
    if value is None or value == "":
        raise CodecError(Reject.MISSING_ID, f"{key!r} is missing or empty")
    if not isinstance(value, str) or not _ID_PATTERN.fullmatch(value):
        raise CodecError(
            Reject.BAD_ID,
            f"{key!r} must be 1-128 characters of A-Z a-z 0-9 . _ : @ -, got {value!r:.80}",
        )
    return value


def _optional_id(meta: Mapping[str, Any], key: str) -> str | None:
    return None if meta.get(key) is None else _id(meta, key)


def _enum(meta: Mapping[str, Any], key: str, cls: type[enum.StrEnum], reason: Reject) -> Any:
    value = meta.get(key)
    if isinstance(value, str):
        try:  # not contextlib.suppress: this is on every push's hot path
            return cls(value)
        except ValueError:
            pass
    # The list of choices is built only for the error (it cost half of decode_push).
    choices = ", ".join(m.value for m in cls)
    value = _get(meta, key, str, f"one of {choices}")
    raise CodecError(reason, f"{key} {value!r:.40} is unknown; expected one of {choices}")


def _nonneg_int(meta: Mapping[str, Any], key: str) -> int:
    value: int = _get(meta, key, int, "a non-negative integer")
    if value < 0:
        raise CodecError(Reject.BAD_FIELD, f"{key!r} must be non-negative, got {value}")
    return value


# ------------------------------------------------------------------------ feature push


def push_layout(
    n: int, shape: tuple[int, ...], dtype: FeatureDType
) -> tuple[int, int, int, int, int]:
    """Byte offsets in a push body: (ids, timestamps, labels, features, total)."""
    ids_at = 0
    ts_at = 8 * n
    labels_at = 16 * n
    features_at = labels_at + _align(4 * n)
    total = features_at + n * math.prod(shape) * dtype.numpy.itemsize
    return ids_at, ts_at, labels_at, features_at, total


def encode_push(push: FeaturePush) -> bytes:
    """Encodes a push. Raises CodecError if its columns disagree with each other."""
    n = push.n
    shape = tuple(int(d) for d in push.features.shape[1:])
    if push.features.shape[0] != n or push.labels.shape != (n,) or push.timestamps_ms.shape != (n,):
        raise CodecError(
            Reject.SIZE_MISMATCH,
            f"columns disagree: {n} sample ids, {push.labels.shape[0]} labels, "
            f"{push.timestamps_ms.shape[0]} timestamps, {push.features.shape[0]} feature rows",
        )
    meta = {
        "model_id": push.model_id,
        "device_id": push.device_id,
        "backbone": push.backbone.value,
        "cut": push.cut.value,
        "dtype": push.dtype.value,
        "shape": list(shape),
        "n": n,
    }
    label_bytes = np.ascontiguousarray(push.labels, dtype=_I32).tobytes()
    return _envelope(
        Kind.FEATURE_PUSH,
        meta,
        [
            np.ascontiguousarray(push.sample_ids, dtype=_U64).tobytes(),
            np.ascontiguousarray(push.timestamps_ms, dtype=_I64).tobytes(),
            label_bytes,
            b"\0" * (_align(len(label_bytes)) - len(label_bytes)),
            np.ascontiguousarray(push.features, dtype=push.dtype.numpy).tobytes(),
        ],
    )


def decode_push(
    data: bytes | bytearray | memoryview,
    *,
    num_classes: int | None = None,
    max_samples: int = DEFAULT_MAX_SAMPLES,
) -> FeaturePush:
    """Decodes and validates a push; arrays are read-only views into ``data``.

    ``num_classes`` (the model's label range) is checked when given; labels must be
    non-negative in any case.
    """
    _, meta, body = _open(data, Kind.FEATURE_PUSH)
    model_id = _id(meta, "model_id")
    device_id = _id(meta, "device_id")
    backbone: Backbone = _enum(meta, "backbone", Backbone, Reject.UNKNOWN_BACKBONE)
    cut: Cut = _enum(meta, "cut", Cut, Reject.UNKNOWN_CUT)
    dtype: FeatureDType = _enum(meta, "dtype", FeatureDType, Reject.UNKNOWN_DTYPE)
    raw_shape = _get(meta, "shape", list, "a list of dimensions")
    expected_shape = FEATURE_SHAPES[backbone][cut]
    if len(raw_shape) != len(expected_shape) or any(
        not isinstance(d, int) or isinstance(d, bool) for d in raw_shape
    ):
        raise CodecError(
            Reject.SHAPE_MISMATCH,
            f"feature shape {raw_shape!r:.80} does not match "
            f"{backbone}/{cut}: {list(expected_shape)}",
        )
    shape = tuple(raw_shape)
    if shape != expected_shape:
        raise CodecError(
            Reject.SHAPE_MISMATCH,
            f"feature shape {list(shape)} does not match {backbone}/{cut}: {list(expected_shape)}",
        )
    n = _nonneg_int(meta, "n")
    if n == 0:
        raise CodecError(Reject.EMPTY_BATCH, "the push holds no samples")
    if n > max_samples:
        raise CodecError(
            Reject.OVERSIZED_BATCH, f"the push holds {n} samples, the limit is {max_samples}"
        )
    ids_at, ts_at, labels_at, features_at, total = push_layout(n, shape, dtype)
    if len(body) != total:
        raise CodecError(
            Reject.SIZE_MISMATCH,
            f"body is {len(body)} bytes; {n} samples of {dtype} {list(shape)} need {total}",
        )
    sample_ids = np.frombuffer(body, _U64, n, ids_at)
    timestamps = np.frombuffer(body, _I64, n, ts_at)
    labels = np.frombuffer(body, _I32, n, labels_at)
    features = np.frombuffer(body, dtype.numpy, n * math.prod(shape), features_at).reshape(
        n, *shape
    )

    # NaN and ±Inf are exactly the values whose exponent bits are all ones: one integer
    # pass over the raw bits, no float conversion on the hot path.
    bits, exponent = _EXPONENT_BITS[dtype]
    if int((features.view(bits) & exponent).max()) == exponent:
        bad = int(np.count_nonzero(~np.isfinite(features)))
        raise CodecError(Reject.NON_FINITE, f"{bad} feature values are NaN or Inf")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or (num_classes is not None and high >= num_classes):
        bound = f"[0, {num_classes})" if num_classes is not None else "non-negative"
        raise CodecError(
            Reject.LABEL_OUT_OF_RANGE,
            f"labels must be {bound} for model {model_id!r}, got min {low} max {high}",
        )
    if n > 1 and len(set(sample_ids.tolist())) != n:
        uniq, counts = np.unique(sample_ids, return_counts=True)
        dupes = uniq[counts > 1][:5].tolist()
        raise CodecError(Reject.DUPLICATE_SAMPLE_ID, f"sample ids repeat within the batch: {dupes}")
    return FeaturePush(
        model_id=model_id,
        device_id=device_id,
        backbone=backbone,
        cut=cut,
        dtype=dtype,
        sample_ids=sample_ids,
        labels=labels,
        timestamps_ms=timestamps,
        features=features,
    )


# -------------------------------------------------------------------- training trigger


def encode_trigger(trigger: TrainingTrigger) -> bytes:
    meta = {
        "model_id": trigger.model_id,
        "trigger_id": trigger.trigger_id,
        "ranges": [[r.partition, r.start, r.end] for r in trigger.ranges],
        "sample_count": trigger.sample_count,
        "reason": trigger.reason.value,
        "base_version": trigger.base_version,
        "attempt": trigger.attempt,
        "created_at_ms": trigger.created_at_ms,
    }
    return _envelope(Kind.TRAINING_TRIGGER, meta)


def decode_trigger(data: bytes | bytearray | memoryview) -> TrainingTrigger:
    _, meta, body = _open(data, Kind.TRAINING_TRIGGER)
    _no_body(body, "a training trigger")
    raw_ranges = _get(meta, "ranges", list, "a list of [partition, start, end]")
    ranges = []
    for item in raw_ranges:
        if (
            not isinstance(item, list)
            or len(item) != 3
            or any(not isinstance(v, int) or isinstance(v, bool) for v in item)
        ):
            raise CodecError(
                Reject.BAD_FIELD, f"range {item!r:.60} must be [partition, start, end]"
            )
        partition, start, end = item
        if partition < 0 or start < 0 or end < start:
            raise CodecError(
                Reject.BAD_FIELD, f"range {item} needs partition ≥ 0 and 0 ≤ start ≤ end"
            )
        ranges.append(OffsetRange(partition, start, end))
    attempt = _nonneg_int(meta, "attempt")
    return TrainingTrigger(
        model_id=_id(meta, "model_id"),
        trigger_id=_id(meta, "trigger_id"),
        ranges=tuple(ranges),
        sample_count=_nonneg_int(meta, "sample_count"),
        reason=_enum(meta, "reason", TriggerReason, Reject.BAD_FIELD),
        base_version=_optional_id(meta, "base_version"),
        attempt=attempt,
        created_at_ms=_nonneg_int(meta, "created_at_ms"),
    )


# ------------------------------------------------------------------------ model update


def encode_update(update: ModelUpdate) -> bytes:
    m = update.metrics
    meta = {
        "model_id": update.model_id,
        "version": update.version,
        "parent_version": update.parent_version,
        "trigger_id": update.trigger_id,
        "backbone": update.backbone.value,
        "cut": update.cut.value,
        "num_classes": update.num_classes,
        "checkpoint_uri": update.checkpoint_uri,
        "sha256": update.sha256,
        "size": update.size,
        "encoding": update.encoding,
        "metrics": {
            "val_accuracy": m.val_accuracy,
            "champion_val_accuracy": m.champion_val_accuracy,
            "train_samples": m.train_samples,
            "val_samples": m.val_samples,
            "train_seconds": m.train_seconds,
            "epochs": m.epochs,
        },
        "is_best": update.is_best,
        "created_at_ms": update.created_at_ms,
        "inline": update.checkpoint is not None,
    }
    if update.checkpoint is not None and len(update.checkpoint) != update.size:
        raise CodecError(
            Reject.SIZE_MISMATCH,
            f"inline checkpoint is {len(update.checkpoint)} bytes, update says {update.size}",
        )
    return _envelope(Kind.MODEL_UPDATE, meta, [update.checkpoint] if update.checkpoint else None)


def decode_update(data: bytes | bytearray | memoryview) -> ModelUpdate:
    """Decodes an update. The inline checkpoint's sha256 is the consumer's to verify."""
    _, meta, body = _open(data, Kind.MODEL_UPDATE)
    size = _nonneg_int(meta, "size")
    inline = _get(meta, "inline", bool, "true or false")
    if inline and len(body) != size:
        raise CodecError(
            Reject.SIZE_MISMATCH, f"inline checkpoint is {len(body)} bytes, size says {size}"
        )
    if not inline:
        _no_body(body, "a by-reference model update")
    sha = _get(meta, "sha256", str, "64 lowercase hex digits")
    if not _SHA256_PATTERN.fullmatch(sha):
        raise CodecError(Reject.BAD_FIELD, f"sha256 {sha!r:.80} is not 64 lowercase hex digits")
    num_classes = _nonneg_int(meta, "num_classes")
    if num_classes == 0:
        raise CodecError(Reject.BAD_FIELD, "num_classes must be positive")
    raw = _get(meta, "metrics", dict, "an object")
    number = (int, float)
    metrics = ModelMetrics(
        val_accuracy=float(_get(raw, "val_accuracy", number, "a number")),
        champion_val_accuracy=_float_or_none(
            _optional(raw, "champion_val_accuracy", number, "a number")
        ),
        train_samples=_nonneg_int(raw, "train_samples"),
        val_samples=_nonneg_int(raw, "val_samples"),
        train_seconds=float(_get(raw, "train_seconds", number, "a number")),
        epochs=_nonneg_int(raw, "epochs"),
    )
    return ModelUpdate(
        model_id=_id(meta, "model_id"),
        version=_id(meta, "version"),
        parent_version=_optional_id(meta, "parent_version"),
        trigger_id=_optional_id(meta, "trigger_id"),
        backbone=_enum(meta, "backbone", Backbone, Reject.UNKNOWN_BACKBONE),
        cut=_enum(meta, "cut", Cut, Reject.UNKNOWN_CUT),
        num_classes=num_classes,
        checkpoint_uri=_get(meta, "checkpoint_uri", str, "a string"),
        sha256=sha,
        size=size,
        encoding=_get(meta, "encoding", str, "a string"),
        metrics=metrics,
        is_best=_get(meta, "is_best", bool, "true or false"),
        created_at_ms=_nonneg_int(meta, "created_at_ms"),
        checkpoint=bytes(body) if inline else None,
    )


def _float_or_none(value: float | int | None) -> float | None:
    return None if value is None else float(value)


# ------------------------------------------------------------------------- dead letter


def encode_dead_letter(letter: DeadLetter) -> bytes:
    meta = {
        "topic": letter.topic,
        "partition": letter.partition,
        "offset": letter.offset,
        "reason": letter.reason,
        "message": letter.message,
        "key": None if letter.key is None else base64.b64encode(letter.key).decode("ascii"),
        "at_ms": letter.at_ms,
    }
    return _envelope(Kind.DEAD_LETTER, meta, [letter.original])


def decode_dead_letter(data: bytes | bytearray | memoryview) -> DeadLetter:
    _, meta, body = _open(data, Kind.DEAD_LETTER)
    raw_key = _optional(meta, "key", str, "base64 text")
    try:
        key = None if raw_key is None else base64.b64decode(raw_key, validate=True)
    except binascii.Error:
        raise CodecError(Reject.BAD_FIELD, "key is not valid base64") from None
    partition: int = _get(meta, "partition", int, "an integer")
    offset: int = _get(meta, "offset", int, "an integer")
    return DeadLetter(
        original=bytes(body),
        topic=_get(meta, "topic", str, "a string"),
        partition=partition,
        offset=offset,
        reason=_get(meta, "reason", str, "a string"),
        message=_get(meta, "message", str, "a string"),
        key=key,
        at_ms=_nonneg_int(meta, "at_ms"),
    )


def _no_body(body: memoryview, what: str) -> None:
    if len(body):
        raise CodecError(Reject.SIZE_MISMATCH, f"{what} has no body, got {len(body)} bytes")


# ------------------------------------------------------------------------------ keys


def encode_key(model_id: str) -> bytes:
    """Message key of pushes, triggers and updates: the model id, so a model's records
    share a partition and stay in order."""
    return model_id.encode("utf-8")


def decode_key(key: bytes | None) -> str | None:
    if key is None:
        return None
    try:
        return key.decode("utf-8")
    except UnicodeDecodeError:
        return None


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
        parts += [raw, b"\0" * (_align(len(raw)) - len(raw))]
    return table, parts


def _tensors_from(
    meta: Mapping[str, Any], body: memoryview, dtype: FeatureDType
) -> dict[str, np.ndarray]:
    """Read-only views of the body's tensors, checked against the metadata's table."""
    table = _get(meta, "tensors", list, "a list of [name, shape]")
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
        at += _align(size)
    if at != len(body):
        raise CodecError(
            Reject.SIZE_MISMATCH, f"body is {len(body)} bytes, the tensor table needs {at}"
        )
    bits, exponent = _EXPONENT_BITS[dtype]
    for name, array in tensors.items():
        if array.size and int((array.view(bits) & exponent).max()) == exponent:
            raise CodecError(Reject.NON_FINITE, f"tensor {name!r} holds NaN or Inf")
    return tensors


def _positive_int(meta: Mapping[str, Any], key: str) -> int:
    value = _nonneg_int(meta, key)
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
    return _envelope(Kind.ROUND_BROADCAST, meta, parts)


def decode_round_broadcast(data: bytes | bytearray | memoryview) -> RoundBroadcast:
    """Decodes and validates a broadcast; tensors are read-only views into ``data``."""
    _, meta, body = _open(data, Kind.ROUND_BROADCAST)
    raw_selected = _get(meta, "selected", list, "a list of device ids")
    if len(raw_selected) > MAX_SELECTED:
        raise CodecError(
            Reject.BAD_FIELD, f"{len(raw_selected)} devices selected, the limit is {MAX_SELECTED}"
        )
    selected = tuple(_id({"device_id": d}, "device_id") for d in raw_selected)
    if len(set(selected)) != len(selected):
        raise CodecError(Reject.BAD_FIELD, "a device is selected twice")
    lr = _get(meta, "lr", (int, float), "a number")
    if not math.isfinite(lr) or lr < 0:
        raise CodecError(Reject.BAD_FIELD, f"'lr' must be finite and ≥ 0, got {lr}")
    dtype: FeatureDType = _enum(meta, "dtype", FeatureDType, Reject.UNKNOWN_DTYPE)
    return RoundBroadcast(
        model_id=_id(meta, "model_id"),
        run_id=_id(meta, "run_id"),
        round=_nonneg_int(meta, "round"),
        backbone=_enum(meta, "backbone", Backbone, Reject.UNKNOWN_BACKBONE),
        cut=_enum(meta, "cut", Cut, Reject.UNKNOWN_CUT),
        num_classes=_positive_int(meta, "num_classes"),
        selected=selected,
        local_epochs=_nonneg_int(meta, "local_epochs"),
        batch_size=_positive_int(meta, "batch_size"),
        lr=float(lr),
        deadline_ms=_nonneg_int(meta, "deadline_ms"),
        dtype=dtype,
        tensors=_tensors_from(meta, body, dtype),
        created_at_ms=_nonneg_int(meta, "created_at_ms"),
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
    return _envelope(Kind.ROUND_UPDATE, meta, parts)


def decode_round_update(data: bytes | bytearray | memoryview) -> RoundUpdate:
    """Decodes and validates a round update; tensors are read-only views into ``data``.
    Whether its tensors fit the round's head is the server's check."""
    _, meta, body = _open(data, Kind.ROUND_UPDATE)
    loss = _optional(meta, "loss", (int, float), "a number")
    if loss is not None and not math.isfinite(loss):
        raise CodecError(Reject.NON_FINITE, f"loss {loss} is not finite")
    dtype: FeatureDType = _enum(meta, "dtype", FeatureDType, Reject.UNKNOWN_DTYPE)
    return RoundUpdate(
        model_id=_id(meta, "model_id"),
        run_id=_id(meta, "run_id"),
        round=_nonneg_int(meta, "round"),
        device_id=_id(meta, "device_id"),
        sample_count=_positive_int(meta, "sample_count"),
        kind=_enum(meta, "kind", UpdateKind, Reject.BAD_FIELD),
        dtype=dtype,
        tensors=_tensors_from(meta, body, dtype),
        loss=_float_or_none(loss),
        created_at_ms=_nonneg_int(meta, "created_at_ms"),
    )


# ------------------------------------------------------------------ agent table value
#
# The aggregation agents keep one state per model in a changelog-backed table. Its value is
# internal to the agents (not a wire record): versioned orjson of plain fields, which the
# agents turn into their ``ModelState``.

MODEL_STATE_VERSION: Final = 1


def encode_model_state(fields: Mapping[str, Any]) -> bytes:
    """Encodes the plain fields of an agent's per-model state (JSON types only)."""
    return orjson.dumps({"v": MODEL_STATE_VERSION, **fields})


def decode_model_state(data: bytes | bytearray | memoryview) -> dict[str, Any]:
    """Decodes what :func:`encode_model_state` wrote; raises CodecError on anything else."""
    try:
        fields = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise CodecError(Reject.BAD_METADATA, f"model state is not valid JSON: {exc}") from None
    if not isinstance(fields, dict):
        raise CodecError(
            Reject.BAD_METADATA, f"model state must be a JSON object, got {type(fields).__name__}"
        )
    version = fields.pop("v", None)
    if version != MODEL_STATE_VERSION:
        raise CodecError(
            Reject.UNSUPPORTED_VERSION,
            f"model state version {version!r} is not supported "
            f"(this codec reads {MODEL_STATE_VERSION})",
        )
    if not isinstance(fields.get("model_id"), str):
        raise CodecError(Reject.MISSING_ID, "model state has no 'model_id'")
    return fields


# ---------------------------------------------------------------- agents' batch summary
#
# Internal to the aggregation agents: their ingest stage validates feature pushes and sends,
# per feature-log partition, one summary of a batch's valid pushes to the agents' summaries
# topic, which their Faust agent counts. Envelope kind 5; metadata names the partition, the
# column length and how many model and device ids follow; the body is five little-endian
# columns of ``n`` entries (offsets i64, log times i64 ms, samples i32, model index i32,
# device index i32) followed by the model ids then the device ids, UTF-8, newline-separated
# (an id never holds a newline).

#: Pushes in one summary at most (an ingest batch is far smaller).
MAX_SUMMARY_PUSHES: Final = 1 << 20
_SUMMARY_ENTRY_BYTES: Final = 28


def encode_summary(summary: BatchSummary) -> bytes:
    """Encodes a batch summary. Raises CodecError if its columns disagree."""
    n = summary.n
    columns = (summary.times_ms, summary.samples, summary.model_index, summary.device_index)
    if any(c.shape != (n,) for c in columns):
        raise CodecError(
            Reject.SIZE_MISMATCH,
            f"summary columns disagree: {n} offsets, then "
            f"{', '.join(str(c.shape[0]) for c in columns)} times, samples, models, devices",
        )
    names = "\n".join((*summary.models, *summary.devices)).encode("utf-8")
    meta = {
        "partition": summary.partition,
        "n": n,
        "models": len(summary.models),
        "devices": len(summary.devices),
    }
    return _envelope(
        Kind.BATCH_SUMMARY,
        meta,
        [
            np.ascontiguousarray(summary.offsets, dtype=_I64).tobytes(),
            np.ascontiguousarray(summary.times_ms, dtype=_I64).tobytes(),
            np.ascontiguousarray(summary.samples, dtype=_I32).tobytes(),
            np.ascontiguousarray(summary.model_index, dtype=_I32).tobytes(),
            np.ascontiguousarray(summary.device_index, dtype=_I32).tobytes(),
            names,
        ],
    )


def decode_summary(data: bytes | bytearray | memoryview) -> BatchSummary:
    """Decodes and checks a batch summary; columns are read-only views into ``data``."""
    _, meta, body = _open(data, Kind.BATCH_SUMMARY)
    partition = _nonneg_int(meta, "partition")
    n = _nonneg_int(meta, "n")
    if n == 0:
        raise CodecError(Reject.EMPTY_BATCH, "the summary holds no pushes")
    if n > MAX_SUMMARY_PUSHES:
        raise CodecError(
            Reject.OVERSIZED_BATCH,
            f"the summary holds {n} pushes, the limit is {MAX_SUMMARY_PUSHES}",
        )
    model_count = _nonneg_int(meta, "models")
    device_count = _nonneg_int(meta, "devices")
    size = _SUMMARY_ENTRY_BYTES * n
    if len(body) < size:
        raise CodecError(
            Reject.SIZE_MISMATCH, f"body is {len(body)} bytes; {n} pushes need at least {size}"
        )
    offsets = np.frombuffer(body, _I64, n, 0)
    times_ms = np.frombuffer(body, _I64, n, 8 * n)
    samples = np.frombuffer(body, _I32, n, 16 * n)
    model_index = np.frombuffer(body, _I32, n, 20 * n)
    device_index = np.frombuffer(body, _I32, n, 24 * n)
    try:
        text = bytes(body[size:]).decode("utf-8")
    except UnicodeDecodeError:
        raise CodecError(Reject.BAD_ID, "model and device ids are not valid UTF-8") from None
    names = text.split("\n") if text else []
    if len(names) != model_count + device_count:
        raise CodecError(
            Reject.SIZE_MISMATCH,
            f"metadata says {model_count} models and {device_count} devices, "
            f"the body holds {len(names)} ids",
        )
    for name in names:
        if not _ID_PATTERN.fullmatch(name):
            raise CodecError(Reject.BAD_ID, f"id {name!r:.80} is not a valid model or device id")
    if int(offsets[0]) < 0 or (n > 1 and bool((np.diff(offsets) <= 0).any())):
        raise CodecError(Reject.BAD_FIELD, "offsets must be non-negative and strictly increasing")
    if int(samples.min()) < 1:
        raise CodecError(Reject.BAD_FIELD, "every push in a summary holds at least one sample")
    if int(times_ms.min()) < 0:
        raise CodecError(Reject.BAD_FIELD, "log times must be non-negative")
    for what, index, count in (
        ("model", model_index, model_count),
        ("device", device_index, device_count),
    ):
        if int(index.min()) < 0 or int(index.max()) >= count:
            raise CodecError(
                Reject.BAD_FIELD, f"{what} indexes must be in [0, {count}) for this summary"
            )
    return BatchSummary(
        partition=partition,
        models=tuple(names[:model_count]),
        model_index=model_index,
        offsets=offsets,
        samples=samples,
        times_ms=times_ms,
        device_index=device_index,
        devices=tuple(names[model_count:]),
    )
