"""Kafka message keys of the model-scoped topics."""

from __future__ import annotations

from typing import Final

from pipeline.codec.envelope import ID_PATTERN, CodecError, Reject

#: Separates model id and version in a model update's key; the id alphabet has no ``/``,
#: so the split is unambiguous.
UPDATE_KEY_SEPARATOR: Final = "/"


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


def encode_update_key(model_id: str, version: str) -> bytes:
    """Message key of a model update: ``<model_id>/<version>``. One key per version, so
    compaction of the model topic keeps every version (the best one included), not only a
    model's latest. The key no longer picks the partition: publishers pass the model's
    partition explicitly (``pipeline.publishing.model_partition``).

    Raises :class:`CodecError` (``bad_id``) if either part is outside the id alphabet, which
    would make the key ambiguous.
    """
    for what, value in (("model id", model_id), ("version", version)):
        if not ID_PATTERN.fullmatch(value):
            raise CodecError(
                Reject.BAD_ID,
                f"{what} must be 1-128 characters of A-Z a-z 0-9 . _ : @ -, got {value!r:.80}",
            )
    return f"{model_id}{UPDATE_KEY_SEPARATOR}{version}".encode()


def decode_update_key(key: bytes | None) -> tuple[str, str | None] | None:
    """``(model_id, version)`` of a model update's key; ``version`` is None for a key in the
    older form (the model id alone), which topics written before still hold. None when there
    is no key or it is not UTF-8."""
    text = decode_key(key)
    if text is None:
        return None
    model_id, separator, version = text.partition(UPDATE_KEY_SEPARATOR)
    return (model_id, version) if separator else (model_id, None)
