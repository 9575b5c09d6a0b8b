"""Envelope v1: the header, record kinds, rejection reasons, the error, and the metadata
field helpers every record's codec shares.

Every message is an envelope: a 16-byte little-endian header, orjson metadata padded to
8 bytes, then a body (see :mod:`pipeline.codec`). The underscore helpers here are the
codec package's own: its record modules build on them, nothing outside the package should.
"""

from __future__ import annotations

import enum
import re
import struct
from collections.abc import Mapping
from typing import Any, Final

import numpy as np
import orjson

from pipeline.errors import FedexError
from pipeline.records import FeatureDType

MAGIC: Final = b"FDXS"
VERSION: Final = 1
HEADER: Final = struct.Struct("<4sBBHII")  # magic, version, kind, flags, meta_len, body_len
HEADER_SIZE: Final = HEADER.size  # 16
ALIGN: Final = 8

MAX_META_BYTES: Final = 64 * 1024

_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9._:@-]{1,128}")

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
    # Raised by the trainer: a trigger id it has seen with other offset ranges.
    TRIGGER_CONFLICT = "trigger_conflict"


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


def _float_or_none(value: float | int | None) -> float | None:
    return None if value is None else float(value)
