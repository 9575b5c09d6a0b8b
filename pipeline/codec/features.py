"""Feature push (kind 1): one device's batch of samples, columnar so that decoding is a
handful of ``np.frombuffer`` views over the message bytes, with no copy."""

from __future__ import annotations

import math
from typing import Any, Final

import numpy as np

from pipeline.codec import fields
from pipeline.codec.envelope import (
    EXPONENT_BITS,
    I32,
    I64,
    U64,
    CodecError,
    Kind,
    Reject,
    align,
    frame,
    unframe,
)
from pipeline.records import FEATURE_SHAPES, Backbone, Cut, FeatureDType, FeaturePush

#: Defaults for decode_push; the agents pass the deployment's settings.
DEFAULT_MAX_SAMPLES: Final = 1024


def push_layout(
    n: int, shape: tuple[int, ...], dtype: FeatureDType
) -> tuple[int, int, int, int, int]:
    """Byte offsets in a push body: (ids, timestamps, labels, features, total)."""
    ids_at = 0
    ts_at = 8 * n
    labels_at = 16 * n
    features_at = labels_at + align(4 * n)
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
    label_bytes = np.ascontiguousarray(push.labels, dtype=I32).tobytes()
    return frame(
        Kind.FEATURE_PUSH,
        meta,
        [
            np.ascontiguousarray(push.sample_ids, dtype=U64).tobytes(),
            np.ascontiguousarray(push.timestamps_ms, dtype=I64).tobytes(),
            label_bytes,
            b"\0" * (align(len(label_bytes)) - len(label_bytes)),
            np.ascontiguousarray(push.features, dtype=push.dtype.numpy).tobytes(),
        ],
    )


def _shape(meta: dict[str, Any], backbone: Backbone, cut: Cut) -> tuple[int, ...]:
    """The push's feature shape, which must be the backbone/cut table's."""
    raw_shape = fields.get(meta, "shape", list, "a list of dimensions")
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
    return shape


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
    _, meta, body = unframe(data, Kind.FEATURE_PUSH)
    model_id = fields.ident(meta, "model_id")
    device_id = fields.ident(meta, "device_id")
    backbone: Backbone = fields.choice(meta, "backbone", Backbone, Reject.UNKNOWN_BACKBONE)
    cut: Cut = fields.choice(meta, "cut", Cut, Reject.UNKNOWN_CUT)
    dtype: FeatureDType = fields.choice(meta, "dtype", FeatureDType, Reject.UNKNOWN_DTYPE)
    shape = _shape(meta, backbone, cut)
    n = fields.nonneg_int(meta, "n")
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
    sample_ids = np.frombuffer(body, U64, n, ids_at)
    timestamps = np.frombuffer(body, I64, n, ts_at)
    labels = np.frombuffer(body, I32, n, labels_at)
    features = np.frombuffer(body, dtype.numpy, n * math.prod(shape), features_at).reshape(
        n, *shape
    )

    # NaN and ±Inf are exactly the values whose exponent bits are all ones: one integer
    # pass over the raw bits, no float conversion on the hot path.
    bits, exponent = EXPONENT_BITS[dtype]
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
