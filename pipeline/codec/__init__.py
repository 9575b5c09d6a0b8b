"""The one wire codec: records ↔ bytes. No other module knows the byte layout.

Every message is an envelope: a 16-byte little-endian header, orjson metadata padded to
8 bytes, then a body. A feature push's body is columnar (sample ids, timestamps, labels,
then the raw feature tensor) so decoding is a handful of ``np.frombuffer`` views over the
message bytes, with no copy. ``docs/wire-format.md`` documents the layout byte by byte for
clients in other languages.

Decoding never trusts its input: anything wrong raises :class:`CodecError` with a
machine-readable :class:`Reject` reason and a message a person understands, and arbitrary
bytes raise nothing else.

Callers use this package as one module (``from pipeline import codec``). Inside it:
``envelope`` (header, kinds, rejects, the error, framing), ``fields`` (the metadata
readers every kind shares), ``features`` (the push), ``control`` (trigger, model update,
dead letter), ``fedavg`` (round records), ``internal`` (the agents' table value and batch
summary) and ``keys`` (message keys).
"""

from pipeline.codec.control import (
    decode_dead_letter,
    decode_trigger,
    decode_update,
    encode_dead_letter,
    encode_trigger,
    encode_update,
)
from pipeline.codec.envelope import (
    ALIGN,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAX_META_BYTES,
    VERSION,
    CodecError,
    Kind,
    Reject,
    peek_kind,
)
from pipeline.codec.features import DEFAULT_MAX_SAMPLES, decode_push, encode_push, push_layout
from pipeline.codec.fedavg import (
    MAX_SELECTED,
    MAX_TENSORS,
    decode_round_broadcast,
    decode_round_update,
    encode_round_broadcast,
    encode_round_update,
)
from pipeline.codec.internal import (
    MAX_SUMMARY_PUSHES,
    MODEL_STATE_VERSION,
    decode_model_state,
    decode_summary,
    encode_model_state,
    encode_summary,
)
from pipeline.codec.keys import (
    UPDATE_KEY_SEPARATOR,
    decode_key,
    decode_update_key,
    encode_key,
    encode_update_key,
)

__all__ = [
    "ALIGN",
    "DEFAULT_MAX_SAMPLES",
    "HEADER",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_META_BYTES",
    "MAX_SELECTED",
    "MAX_SUMMARY_PUSHES",
    "MAX_TENSORS",
    "MODEL_STATE_VERSION",
    "UPDATE_KEY_SEPARATOR",
    "VERSION",
    "CodecError",
    "Kind",
    "Reject",
    "decode_dead_letter",
    "decode_key",
    "decode_model_state",
    "decode_push",
    "decode_round_broadcast",
    "decode_round_update",
    "decode_summary",
    "decode_trigger",
    "decode_update",
    "decode_update_key",
    "encode_dead_letter",
    "encode_key",
    "encode_model_state",
    "encode_push",
    "encode_round_broadcast",
    "encode_round_update",
    "encode_summary",
    "encode_trigger",
    "encode_update",
    "encode_update_key",
    "peek_kind",
    "push_layout",
]
