"""Readers of a record's metadata fields, shared by every record kind's decoder.

Each names the field it reads and raises :class:`~pipeline.codec.envelope.CodecError` with
the reason and what was wrong (a missing field, a wrong type, an unknown choice, a bad id).
Kind modules call them as ``fields.ident(meta, "model_id")``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

from pipeline.codec.envelope import ID_PATTERN, CodecError, Reject


def get(meta: Mapping[str, Any], key: str, types: type | tuple[type, ...], what: str) -> Any:
    if key not in meta or meta[key] is None:
        raise CodecError(Reject.MISSING_FIELD, f"metadata has no {key!r} ({what})")
    value = meta[key]
    # bool is an int in Python; a JSON true is never a valid count or offset.
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        raise CodecError(Reject.BAD_FIELD, f"{key!r} must be {what}, got {value!r:.80}")
    return value


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def optional(meta: Mapping[str, Any], key: str, types: type | tuple[type, ...], what: str) -> Any:
    if meta.get(key) is None:
        return None
    return get(meta, key, types, what)


def ident(meta: Mapping[str, Any], key: str) -> str:
    value = meta.get(key)
    if value is None or value == "":
        raise CodecError(Reject.MISSING_ID, f"{key!r} is missing or empty")
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise CodecError(
            Reject.BAD_ID,
            f"{key!r} must be 1-128 characters of A-Z a-z 0-9 . _ : @ -, got {value!r:.80}",
        )
    return value


def optional_ident(meta: Mapping[str, Any], key: str) -> str | None:
    return None if meta.get(key) is None else ident(meta, key)


def choice(meta: Mapping[str, Any], key: str, cls: type[enum.StrEnum], reason: Reject) -> Any:
    value = meta.get(key)
    if isinstance(value, str):
        try:  # not contextlib.suppress: this is on every push's hot path
            return cls(value)
        except ValueError:
            pass
    # The list of choices is built only for the error (it cost half of decode_push).
    choices = ", ".join(m.value for m in cls)
    value = get(meta, key, str, f"one of {choices}")
    raise CodecError(reason, f"{key} {value!r:.40} is unknown; expected one of {choices}")


def nonneg_int(meta: Mapping[str, Any], key: str) -> int:
    value: int = get(meta, key, int, "a non-negative integer")
    if value < 0:
        raise CodecError(Reject.BAD_FIELD, f"{key!r} must be non-negative, got {value}")
    return value


def float_or_none(value: float | int | None) -> float | None:
    return None if value is None else float(value)
