"""Round trips for every record and dtype, every rejection reason, and fuzzed bytes."""

from __future__ import annotations

import contextlib
import random
import struct
from dataclasses import replace
from typing import Any

import numpy as np
import orjson
import pytest

from pipeline import codec
from pipeline.codec import CodecError, Kind, Reject
from pipeline.codec.envelope import frame
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
from tests import factories

#: The epoch of every record here: times are T0 plus a few milliseconds.
T0 = 1_795_000_000_000


def make_push(
    n: int = 10,
    *,
    backbone: Backbone = Backbone.INCEPTION_RESNET_V1,
    cut: Cut = Cut.FREEZE6,
    dtype: FeatureDType = FeatureDType.FLOAT16,
    seed: int = 0,
) -> FeaturePush:
    """``n`` samples of ``dev-000042`` (ids from 100), labels over 1000 classes, each at
    its own millisecond."""
    labels = np.random.default_rng(seed).integers(0, 1000, n)
    return factories.push(
        device=42,
        n=n,
        first_id=100,
        labels=labels,
        backbone=backbone,
        cut=cut,
        dtype=dtype,
        seed=seed,
        timestamps_ms=T0 + np.arange(n),
    )


def make_update(inline: bool = True) -> ModelUpdate:
    return factories.update(
        "faces-1",
        "v-trig-7",
        parent_version="v-trig-3",
        trigger_id="trig-7",
        num_classes=1000,
        checkpoint_uri="ckpt://faces-1/v-trig-7",
        sha256="ab" * 32,
        encoding="safetensors",
        metrics=ModelMetrics(0.81, 0.74, 9000, 1000, 3.5, 5),
        blob=bytes(range(256)) * 4,
        inline=inline,
        created_at_ms=T0 + 123,
    )


def rewrite_meta(data: bytes, **changes: Any) -> bytes:
    """Re-frames a message with edited metadata (None removes a key), body kept."""
    _, _, _, _, meta_len, body_len = codec.HEADER.unpack_from(data, 0)
    meta = orjson.loads(data[16 : 16 + meta_len])
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    body = data[len(data) - body_len :]
    return frame(Kind(data[5]), meta, [body])


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", list(FeatureDType))
@pytest.mark.parametrize("cut", [Cut.FREEZE6, Cut.FREEZE5, Cut.FREEZE4, Cut.FREEZE1, Cut.FULL])
def test_push_round_trip(dtype: FeatureDType, cut: Cut) -> None:
    push = make_push(3, cut=cut, dtype=dtype)
    data = codec.encode_push(push)
    back = codec.decode_push(data, num_classes=1000)
    assert back.same_as(push)
    assert back.features.dtype == dtype.numpy
    assert back.feature_shape == FEATURE_SHAPES[push.backbone][cut]


def test_push_decode_is_zero_copy_and_read_only() -> None:
    data = codec.encode_push(make_push())
    back = codec.decode_push(data)
    assert not back.features.flags.owndata
    assert not back.features.flags.writeable
    # The feature rows are the message's own bytes.
    assert np.shares_memory(back.features, np.frombuffer(data, np.uint8))


def test_push_layout_is_aligned_and_exact() -> None:
    push = make_push(3)
    data = codec.encode_push(push)
    magic, version, kind, flags, meta_len, body_len = codec.HEADER.unpack_from(data, 0)
    assert (magic, version, kind, flags) == (b"FDXS", 1, Kind.FEATURE_PUSH, 0)
    body_at = len(data) - body_len
    assert body_at % 8 == 0 and body_at >= 16 + meta_len
    # 3 ids + 3 timestamps + 3 labels padded to 16 + 3×512 float16.
    assert body_len == 24 + 24 + 16 + 3 * 512 * 2
    assert data[body_at : body_at + 8] == struct.pack("<Q", 100)


def test_mobilenet_push_round_trip() -> None:
    push = make_push(2, backbone=Backbone.MOBILENET_V2, cut=Cut.FREEZE5)
    assert codec.decode_push(codec.encode_push(push)).same_as(push)


def test_decode_accepts_memoryview_and_bytearray() -> None:
    data = codec.encode_push(make_push())
    assert codec.decode_push(memoryview(data)).n == 10
    assert codec.decode_push(bytearray(data)).n == 10


@pytest.mark.parametrize("base_version", [None, "v-3"])
def test_trigger_round_trip(base_version: str | None) -> None:
    trigger = TrainingTrigger(
        model_id="faces-1",
        trigger_id="faces-1:t:00017",
        ranges=(OffsetRange(0, 10, 250), OffsetRange(3, 0, 7)),
        sample_count=2470,
        reason=TriggerReason.AGE,
        base_version=base_version,
        attempt=2,
        created_at_ms=T0,
    )
    assert codec.decode_trigger(codec.encode_trigger(trigger)) == trigger


@pytest.mark.parametrize("inline", [True, False])
def test_update_round_trip(inline: bool) -> None:
    update = make_update(inline)
    assert codec.decode_update(codec.encode_update(update)) == update


def test_update_without_champion_round_trip() -> None:
    update = replace(
        make_update(), metrics=ModelMetrics(0.5, None, 10, 2, 0.1, 1), parent_version=None
    )
    assert codec.decode_update(codec.encode_update(update)) == update


@pytest.mark.parametrize("key", [None, b"faces-1", b"\xff\x00binary"])
def test_dead_letter_round_trip(key: bytes | None) -> None:
    letter = DeadLetter(
        original=b"\x00garbage\xff",
        topic="fedex.features",
        partition=2,
        offset=12345,
        reason="non_finite",
        message="3 feature values are NaN or Inf",
        key=key,
        at_ms=T0,
    )
    assert codec.decode_dead_letter(codec.encode_dead_letter(letter)) == letter


def test_peek_kind() -> None:
    assert codec.peek_kind(codec.encode_push(make_push())) is Kind.FEATURE_PUSH
    assert codec.peek_kind(codec.encode_update(make_update())) is Kind.MODEL_UPDATE


def test_keys_round_trip() -> None:
    assert codec.decode_key(codec.encode_key("faces-1")) == "faces-1"
    assert codec.decode_key(None) is None
    assert codec.decode_key(b"\xff") is None


def test_update_keys_round_trip_and_read_the_older_form() -> None:
    key = codec.encode_update_key("faces-1", "v3")
    assert key == b"faces-1/v3"
    assert codec.decode_update_key(key) == ("faces-1", "v3")
    assert codec.decode_update_key(codec.encode_key("faces-1")) == ("faces-1", None)
    assert codec.decode_update_key(None) is None
    assert codec.decode_update_key(b"\xff") is None


@pytest.mark.parametrize(("model_id", "version"), [("a/b", "v1"), ("m", "v/1"), ("", "v1")])
def test_update_keys_refuse_parts_outside_the_id_alphabet(model_id: str, version: str) -> None:
    with pytest.raises(CodecError) as info:
        codec.encode_update_key(model_id, version)
    assert info.value.reason is Reject.BAD_ID


# ------------------------------------------------------------------------ rejections


def reject_reason(data: bytes, **kwargs: Any) -> Reject:
    with pytest.raises(CodecError) as info:
        codec.decode_push(data, **kwargs)
    assert info.value.message  # a person-readable explanation
    assert str(info.value).startswith(info.value.reason.value)
    return info.value.reason


GOOD = codec.encode_push(make_push())


def test_reject_short_and_truncated() -> None:
    assert reject_reason(b"") is Reject.TRUNCATED
    assert reject_reason(GOOD[:10]) is Reject.TRUNCATED
    assert reject_reason(GOOD[:-1]) is Reject.TRUNCATED


def test_reject_trailing_bytes() -> None:
    assert reject_reason(GOOD + b"\0") is Reject.SIZE_MISMATCH


def test_reject_bad_magic_version_kind_flags() -> None:
    assert reject_reason(b"JUNK" + GOOD[4:]) is Reject.BAD_MAGIC
    assert reject_reason(GOOD[:4] + b"\x02" + GOOD[5:]) is Reject.UNSUPPORTED_VERSION
    assert reject_reason(GOOD[:5] + b"\x09" + GOOD[6:]) is Reject.UNKNOWN_KIND
    assert reject_reason(GOOD[:5] + b"\x02" + GOOD[6:]) is Reject.WRONG_KIND
    assert reject_reason(GOOD[:6] + b"\x01\x00" + GOOD[8:]) is Reject.BAD_FLAGS


def test_reject_metadata_not_json_or_not_object() -> None:
    _, _, _, _, meta_len, _ = codec.HEADER.unpack_from(GOOD, 0)
    broken = GOOD[:16] + b"{" * meta_len + GOOD[16 + meta_len :]
    assert reject_reason(broken) is Reject.BAD_METADATA
    as_list = frame(Kind.FEATURE_PUSH, {}, [])  # valid framing
    as_list = as_list[:8] + struct.pack("<II", 2, 0) + b"[]" + b"\0" * 6
    assert reject_reason(as_list) is Reject.BAD_METADATA


def test_reject_wrong_byte_count_for_dtype_and_shape() -> None:
    assert reject_reason(rewrite_meta(GOOD, dtype="float32")) is Reject.SIZE_MISMATCH
    assert reject_reason(rewrite_meta(GOOD, n=9)) is Reject.SIZE_MISMATCH


def test_reject_unknown_cut_backbone_dtype() -> None:
    assert reject_reason(rewrite_meta(GOOD, cut="freeze9")) is Reject.UNKNOWN_CUT
    assert reject_reason(rewrite_meta(GOOD, backbone="resnet50")) is Reject.UNKNOWN_BACKBONE
    assert reject_reason(rewrite_meta(GOOD, dtype="int8")) is Reject.UNKNOWN_DTYPE


def test_reject_shape_not_matching_cut() -> None:
    assert reject_reason(rewrite_meta(GOOD, shape=[256])) is Reject.SHAPE_MISMATCH
    assert reject_reason(rewrite_meta(GOOD, shape=[512, 1])) is Reject.SHAPE_MISMATCH
    assert reject_reason(rewrite_meta(GOOD, shape=["512"])) is Reject.SHAPE_MISMATCH
    assert reject_reason(rewrite_meta(GOOD, cut="freeze5")) is Reject.SHAPE_MISMATCH


def test_reject_missing_and_bad_ids() -> None:
    assert reject_reason(rewrite_meta(GOOD, model_id=None)) is Reject.MISSING_ID
    assert reject_reason(rewrite_meta(GOOD, device_id="")) is Reject.MISSING_ID
    assert reject_reason(rewrite_meta(GOOD, device_id="../etc")) is Reject.BAD_ID
    assert reject_reason(rewrite_meta(GOOD, model_id=7)) is Reject.BAD_ID


def test_reject_missing_or_mistyped_fields() -> None:
    assert reject_reason(rewrite_meta(GOOD, n=None)) is Reject.MISSING_FIELD
    assert reject_reason(rewrite_meta(GOOD, n=True)) is Reject.BAD_FIELD
    assert reject_reason(rewrite_meta(GOOD, n=-1)) is Reject.BAD_FIELD
    assert reject_reason(rewrite_meta(GOOD, shape="512")) is Reject.BAD_FIELD


def test_reject_empty_and_oversized_batch() -> None:
    empty = replace(
        make_push(1),
        sample_ids=np.zeros(0, np.uint64),
        labels=np.zeros(0, np.int32),
        timestamps_ms=np.zeros(0, np.int64),
        features=np.zeros((0, 512), np.float16),
    )
    assert reject_reason(codec.encode_push(empty)) is Reject.EMPTY_BATCH
    assert reject_reason(codec.encode_push(make_push(11)), max_samples=10) is Reject.OVERSIZED_BATCH
    assert codec.decode_push(codec.encode_push(make_push(10)), max_samples=10).n == 10


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", list(FeatureDType))
def test_reject_non_finite(bad: float, dtype: FeatureDType) -> None:
    push = make_push(dtype=dtype)
    features = push.features.copy()
    features[7, 300] = bad
    data = codec.encode_push(replace(push, features=features))
    assert reject_reason(data) is Reject.NON_FINITE


def test_large_finite_float16_values_are_not_mistaken_for_inf() -> None:
    push = make_push()
    features = np.full_like(push.features, 65504.0)  # float16 max: sums overflow in float16
    assert codec.decode_push(codec.encode_push(replace(push, features=features))).n == 10


def test_reject_labels_out_of_range() -> None:
    push = make_push()
    labels = push.labels.copy()
    labels[0] = 1000
    data = codec.encode_push(replace(push, labels=labels))
    assert reject_reason(data, num_classes=1000) is Reject.LABEL_OUT_OF_RANGE
    assert codec.decode_push(data, num_classes=1001).n == 10
    labels[0] = -1
    negative = codec.encode_push(replace(push, labels=labels))
    assert reject_reason(negative) is Reject.LABEL_OUT_OF_RANGE


def test_reject_duplicate_sample_ids() -> None:
    push = make_push()
    ids = push.sample_ids.copy()
    ids[5] = ids[2]
    assert (
        reject_reason(codec.encode_push(replace(push, sample_ids=ids)))
        is Reject.DUPLICATE_SAMPLE_ID
    )


def test_encode_rejects_inconsistent_columns() -> None:
    push = make_push()
    with pytest.raises(CodecError) as info:
        codec.encode_push(replace(push, labels=push.labels[:3]))
    assert info.value.reason is Reject.SIZE_MISMATCH


def test_reject_bad_trigger_and_update_fields() -> None:
    trigger = TrainingTrigger(
        "m", "t", (OffsetRange(0, 5, 9),), 4, TriggerReason.COUNT, created_at_ms=1
    )
    data = codec.encode_trigger(trigger)
    for changes, reason in [
        ({"ranges": [[0, 9, 5]]}, Reject.BAD_FIELD),
        ({"ranges": [[0, 1]]}, Reject.BAD_FIELD),
        ({"reason": "whim"}, Reject.BAD_FIELD),
        ({"trigger_id": None}, Reject.MISSING_ID),
    ]:
        with pytest.raises(CodecError) as info:
            codec.decode_trigger(rewrite_meta(data, **changes))
        assert info.value.reason is reason, changes
    with pytest.raises(CodecError) as info:
        codec.decode_push(data)
    assert info.value.reason is Reject.WRONG_KIND

    update = codec.encode_update(make_update(inline=True))
    for changes, reason in [
        ({"sha256": "xyz"}, Reject.BAD_FIELD),
        ({"size": 3}, Reject.SIZE_MISMATCH),
        ({"num_classes": 0}, Reject.BAD_FIELD),
        ({"metrics": {"val_accuracy": "high"}}, Reject.BAD_FIELD),
        ({"cut": "freeze0"}, Reject.UNKNOWN_CUT),
    ]:
        with pytest.raises(CodecError) as info:
            codec.decode_update(rewrite_meta(update, **changes))
        assert info.value.reason is reason, changes


# ---------------------------------------------------------------------------------- fuzz


def _samples() -> list[bytes]:
    trigger = TrainingTrigger(
        "m", "t", (OffsetRange(0, 5, 9),), 4, TriggerReason.COUNT, created_at_ms=1
    )
    letter = DeadLetter(b"x", "t", 0, 1, "r", "m", None, 1)
    return [
        codec.encode_push(make_push(3)),
        codec.encode_push(make_push(2, cut=Cut.FREEZE4, dtype=FeatureDType.FLOAT32)),
        codec.encode_trigger(trigger),
        codec.encode_update(make_update()),
        codec.encode_dead_letter(letter),
    ]


def _decode_any(data: bytes) -> None:
    for decode in (
        codec.decode_push,
        codec.decode_trigger,
        codec.decode_update,
        codec.decode_dead_letter,
    ):
        with contextlib.suppress(CodecError):
            decode(data)


def test_fuzz_random_bytes_raise_only_codec_errors() -> None:
    rng = random.Random(1234)
    for _ in range(3000):
        n = rng.randrange(0, 200)
        head = codec.MAGIC + bytes([1, rng.randrange(0, 6)]) if rng.random() < 0.5 else b""
        _decode_any(head + rng.randbytes(n))


def test_fuzz_mutated_messages_raise_only_codec_errors() -> None:
    rng = random.Random(99)
    samples = _samples()
    for _ in range(6000):
        data = bytearray(rng.choice(samples))
        op = rng.randrange(4)
        if op == 0:  # flip bytes anywhere, mostly in the header and metadata
            for _ in range(rng.randrange(1, 6)):
                i = (
                    rng.randrange(min(len(data), 256))
                    if rng.random() < 0.8
                    else rng.randrange(len(data))
                )
                data[i] = rng.randrange(256)
        elif op == 1:  # truncate
            del data[rng.randrange(len(data)) :]
        elif op == 2:  # rewrite the length fields
            struct.pack_into("<II", data, 8, rng.randrange(0, 1 << 32), rng.randrange(0, 1 << 32))
        else:  # splice random bytes
            i = rng.randrange(len(data))
            data[i:i] = rng.randbytes(rng.randrange(1, 32))
        _decode_any(bytes(data))


def test_fuzz_metadata_values_raise_only_codec_errors() -> None:
    rng = random.Random(7)
    weird: list[Any] = [None, True, -1, 0, 2**63, 1.5, "", "x" * 300, [], {}, [1, "a"], [[1, 2, 3]]]
    samples = _samples()
    for _ in range(3000):
        data = rng.choice(samples)
        _, _, _, _, meta_len, _ = codec.HEADER.unpack_from(data, 0)
        keys = [*orjson.loads(data[16 : 16 + meta_len]), "metrics", "ranges", "key"]
        changes = {rng.choice(keys): rng.choice(weird) for _ in range(rng.randrange(1, 4))}
        try:
            mutated = rewrite_meta(data, **changes)
        except CodecError:
            continue
        _decode_any(mutated)


def test_hand_built_push_per_wire_format_doc_decodes() -> None:
    """Builds the worked example of docs/wire-format.md with struct alone, as a client
    in another language would, and checks the codec accepts it and agrees byte for byte."""
    n = 10
    meta = (
        b'{"model_id":"faces-1","device_id":"dev-000042","backbone":"inception_resnet_v1",'
        b'"cut":"freeze6","dtype":"float16","shape":[512],"n":10}'
    )
    assert len(meta) == 135
    pad = (8 - (16 + len(meta)) % 8) % 8
    ids = struct.pack(f"<{n}Q", *range(100, 100 + n))
    stamps = struct.pack(f"<{n}q", *[1_795_000_000_000 + i for i in range(n)])
    labels = struct.pack(f"<{n}i", *range(n))
    features = struct.pack(f"<{n * 512}e", *[0.5] * (n * 512))
    body = ids + stamps + labels + b"\0" * ((8 - 4 * n % 8) % 8) + features
    msg = b"FDXS" + struct.pack("<BBHII", 1, 1, 0, len(meta), len(body)) + meta + b"\0" * pad + body
    assert 16 + len(meta) + pad == 152 and len(msg) == 10_592

    push = codec.decode_push(msg, num_classes=10)
    assert push.sample_ids.tolist() == list(range(100, 110))
    assert push.labels.tolist() == list(range(10))
    assert float(push.features[9, 511]) == 0.5
    assert codec.encode_push(push) == msg


# ------------------------------------------------------------- agents' batch summary


def make_summary(n: int = 4) -> BatchSummary:
    return BatchSummary(
        partition=3,
        models=("faces-1", "faces-2")[: min(n, 2)],
        model_index=np.array([0, 1, 0, 1][:n], dtype=np.int32) % min(n, 2),
        offsets=np.array([5, 9, 10, 40][:n], dtype=np.int64),
        samples=np.array([10, 1, 7, 1024][:n], dtype=np.int32),
        times_ms=np.array([T0 + i for i in range(n)], dtype=np.int64),
        device_index=np.array([0, 1, 0, 2][:n], dtype=np.int32) % min(n, 3),
        devices=("dev-a", "dev-b", "dev:c@x")[: min(n, 3)],
    )


def test_summary_round_trip() -> None:
    summary = make_summary()
    data = codec.encode_summary(summary)
    assert codec.peek_kind(data) is Kind.BATCH_SUMMARY
    back = codec.decode_summary(data)
    assert back.same_as(summary)
    assert (back.n, back.sample_count, back.models) == (4, 1042, ("faces-1", "faces-2"))
    assert codec.encode_summary(back) == data
    one = make_summary(1)
    assert codec.decode_summary(codec.encode_summary(one)).same_as(one)


def test_summary_encode_rejects_columns_that_disagree() -> None:
    summary = make_summary()
    with pytest.raises(CodecError) as info:
        codec.encode_summary(replace(summary, samples=summary.samples[:3]))
    assert info.value.reason is Reject.SIZE_MISMATCH


def _summary_reason(summary: BatchSummary, **meta: Any) -> Reject:
    data = codec.encode_summary(summary)
    if meta:
        data = rewrite_meta(data, **meta)
    with pytest.raises(CodecError) as info:
        codec.decode_summary(data)
    return info.value.reason


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"offsets": np.array([5, 9, 9, 40], dtype=np.int64)}, Reject.BAD_FIELD),
        ({"offsets": np.array([-1, 9, 10, 40], dtype=np.int64)}, Reject.BAD_FIELD),
        ({"samples": np.array([10, 0, 7, 1], dtype=np.int32)}, Reject.BAD_FIELD),
        ({"times_ms": np.array([-5, 0, 0, 0], dtype=np.int64)}, Reject.BAD_FIELD),
        ({"device_index": np.array([0, 1, 0, 3], dtype=np.int32)}, Reject.BAD_FIELD),
        ({"device_index": np.array([0, -1, 0, 0], dtype=np.int32)}, Reject.BAD_FIELD),
        ({"model_index": np.array([0, 1, 2, 0], dtype=np.int32)}, Reject.BAD_FIELD),
        ({"devices": ("dev-a", "bad id", "c")}, Reject.BAD_ID),
        ({"models": ("faces-1", "")}, Reject.BAD_ID),
    ],
)
def test_summary_decode_rejects_bad_columns(change: dict[str, Any], reason: Reject) -> None:
    assert _summary_reason(replace(make_summary(), **change)) is reason


@pytest.mark.parametrize(
    ("meta", "reason"),
    [
        ({"n": 0}, Reject.EMPTY_BATCH),
        ({"n": 5}, Reject.SIZE_MISMATCH),
        ({"n": codec.MAX_SUMMARY_PUSHES + 1}, Reject.OVERSIZED_BATCH),
        ({"n": "4"}, Reject.BAD_FIELD),
        ({"devices": 2}, Reject.SIZE_MISMATCH),
        # The split between model and device ids moves: index checks catch it.
        ({"models": 3, "devices": 2}, Reject.BAD_FIELD),
        ({"partition": -1}, Reject.BAD_FIELD),
        ({"partition": None}, Reject.MISSING_FIELD),
        ({"models": None}, Reject.MISSING_FIELD),
    ],
)
def test_summary_decode_rejects_bad_metadata(meta: dict[str, Any], reason: Reject) -> None:
    assert _summary_reason(make_summary(), **meta) is reason


def test_summary_decode_rejects_other_kinds_and_non_utf8_ids() -> None:
    with pytest.raises(CodecError) as info:
        codec.decode_summary(codec.encode_push(make_push()))
    assert info.value.reason is Reject.WRONG_KIND
    data = bytearray(codec.encode_summary(make_summary(1)))
    data[-1] = 0xFF  # the last byte of the device ids
    with pytest.raises(CodecError) as info:
        codec.decode_summary(bytes(data))
    assert info.value.reason is Reject.BAD_ID


def test_fuzz_mutated_summaries_raise_only_codec_errors() -> None:
    rng = random.Random(5)
    good = codec.encode_summary(make_summary())
    for _ in range(3000):
        data = bytearray(good)
        for _ in range(rng.randrange(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.3:
            data = data[: rng.randrange(len(data))]
        with contextlib.suppress(CodecError):
            codec.decode_summary(bytes(data))


# ------------------------------------------------------------- FedAvg baseline (issue 5)


def make_fedavg_tensors(dtype: FeatureDType, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "logits.weight": rng.standard_normal((7, 512)).astype(dtype.numpy),
        "logits.bias": rng.standard_normal(7).astype(dtype.numpy),  # 7·e bytes: padded
        "last_bn.num_batches_seen": np.zeros((0,), dtype=dtype.numpy),
    }


def make_round_update(dtype: FeatureDType = FeatureDType.FLOAT32) -> RoundUpdate:
    return RoundUpdate(
        model_id="faces-1",
        run_id="run-1",
        round=3,
        device_id="dev-000042",
        sample_count=32,
        kind=UpdateKind.DELTA,
        dtype=dtype,
        tensors=make_fedavg_tensors(dtype),
        loss=0.25,
        created_at_ms=T0 + 123,
    )


def make_broadcast(dtype: FeatureDType = FeatureDType.FLOAT32) -> RoundBroadcast:
    return RoundBroadcast(
        model_id="faces-1",
        run_id="run-1",
        round=3,
        backbone=Backbone.INCEPTION_RESNET_V1,
        cut=Cut.FREEZE6,
        num_classes=7,
        selected=("dev-1", "dev-2"),
        local_epochs=5,
        batch_size=10,
        lr=0.05,
        deadline_ms=T0 + 30_000,
        dtype=dtype,
        tensors=make_fedavg_tensors(dtype, seed=1),
        created_at_ms=T0,
    )


@pytest.mark.parametrize("dtype", list(FeatureDType))
def test_round_update_and_broadcast_round_trip(dtype: FeatureDType) -> None:
    update = make_round_update(dtype)
    data = codec.encode_round_update(update)
    decoded = codec.decode_round_update(data)
    assert decoded.same_as(update)
    assert codec.peek_kind(data) is Kind.ROUND_UPDATE
    assert not decoded.tensors["logits.weight"].flags.writeable  # views, no copy
    broadcast = make_broadcast(dtype)
    data = codec.encode_round_broadcast(broadcast)
    assert codec.decode_round_broadcast(data).same_as(broadcast)
    assert codec.peek_kind(data) is Kind.ROUND_BROADCAST
    final = replace(broadcast, selected=())  # the run's final model
    assert codec.decode_round_broadcast(codec.encode_round_broadcast(final)).same_as(final)


def test_round_update_body_is_raw_little_endian_tensors_padded_to_8() -> None:
    update = make_round_update(FeatureDType.FLOAT16)
    data = codec.encode_round_update(update)
    _, _, kind, _, meta_len, body_len = codec.HEADER.unpack_from(data, 0)
    assert kind == Kind.ROUND_UPDATE == 7
    meta = orjson.loads(data[16 : 16 + meta_len])
    assert meta["tensors"] == [
        ["logits.weight", [7, 512]],
        ["logits.bias", [7]],
        ["last_bn.num_batches_seen", [0]],
    ]
    body = data[len(data) - body_len :]
    weight = update.tensors["logits.weight"].astype("<f2").tobytes()
    bias = update.tensors["logits.bias"].astype("<f2").tobytes()
    assert body == weight + bias + b"\0" * 2  # 14 bytes of bias padded to 16
    # A float32 loss-free update converts float64 input to the record's dtype.
    wide = replace(make_round_update(), loss=None, tensors={"w": np.ones((2, 3))})
    decoded = codec.decode_round_update(codec.encode_round_update(wide))
    assert decoded.loss is None and decoded.tensors["w"].dtype == np.dtype("<f4")


def fedavg_reason(data: bytes, decode: Any = codec.decode_round_update) -> Reject:
    with pytest.raises(CodecError) as info:
        decode(data)
    return info.value.reason


def test_round_update_rejections() -> None:
    good = codec.encode_round_update(make_round_update())
    assert fedavg_reason(good[:-4]) is Reject.TRUNCATED
    assert fedavg_reason(codec.encode_round_broadcast(make_broadcast())) is Reject.WRONG_KIND
    assert fedavg_reason(rewrite_meta(good, device_id="bad id")) is Reject.BAD_ID
    assert fedavg_reason(rewrite_meta(good, run_id="")) is Reject.MISSING_ID
    assert fedavg_reason(rewrite_meta(good, round=-1)) is Reject.BAD_FIELD
    assert fedavg_reason(rewrite_meta(good, sample_count=0)) is Reject.BAD_FIELD
    assert fedavg_reason(rewrite_meta(good, kind="weights")) is Reject.BAD_FIELD
    assert fedavg_reason(rewrite_meta(good, dtype="int8")) is Reject.UNKNOWN_DTYPE
    assert fedavg_reason(rewrite_meta(good, tensors=None)) is Reject.MISSING_FIELD
    assert fedavg_reason(rewrite_meta(good, tensors=[])) is Reject.BAD_FIELD
    # the table must account for the body exactly
    table = [["logits.weight", [7, 512]], ["logits.bias", [7]]]
    assert fedavg_reason(rewrite_meta(good, tensors=table[:1])) is Reject.SIZE_MISMATCH
    bigger = [["logits.weight", [8, 512]], ["logits.bias", [7]]]
    assert fedavg_reason(rewrite_meta(good, tensors=bigger)) is Reject.SIZE_MISMATCH
    twice = [["logits.weight", [7, 256]], ["logits.weight", [7, 256]], ["logits.bias", [7]]]
    assert fedavg_reason(rewrite_meta(good, tensors=twice)) is Reject.BAD_FIELD
    for entry in (["w", [-1]], ["", [1]], ["w", "7"], ["w", [True]], "w", ["w", [1] * 9]):
        assert fedavg_reason(rewrite_meta(good, tensors=[entry])) is Reject.SHAPE_MISMATCH
    assert fedavg_reason(rewrite_meta(good, loss="low")) is Reject.BAD_FIELD


@pytest.mark.parametrize("dtype", list(FeatureDType))
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_round_records_reject_non_finite_tensors(dtype: FeatureDType, bad: float) -> None:
    tensors = make_fedavg_tensors(dtype)
    tensors["logits.bias"] = tensors["logits.bias"].copy()
    tensors["logits.bias"][3] = bad
    data = codec.encode_round_update(replace(make_round_update(dtype), tensors=tensors))
    assert fedavg_reason(data) is Reject.NON_FINITE
    data = codec.encode_round_broadcast(replace(make_broadcast(dtype), tensors=tensors))
    assert fedavg_reason(data, codec.decode_round_broadcast) is Reject.NON_FINITE
    with pytest.raises(CodecError) as info:
        codec.encode_round_update(replace(make_round_update(dtype), loss=float("nan")))
    assert info.value.reason is Reject.NON_FINITE


def test_round_broadcast_rejections() -> None:
    good = codec.encode_round_broadcast(make_broadcast())

    def reason(**meta: Any) -> Reject:
        return fedavg_reason(rewrite_meta(good, **meta), codec.decode_round_broadcast)

    assert reason(selected=["dev-1", "dev-1"]) is Reject.BAD_FIELD
    assert reason(selected=["dev 1"]) is Reject.BAD_ID
    assert reason(selected="dev-1") is Reject.BAD_FIELD
    assert reason(selected=[f"d{i}" for i in range(codec.MAX_SELECTED + 1)]) is Reject.BAD_FIELD
    assert reason(lr=-0.1) is Reject.BAD_FIELD
    assert reason(batch_size=0) is Reject.BAD_FIELD
    assert reason(num_classes=0) is Reject.BAD_FIELD
    assert reason(cut="freeze9") is Reject.UNKNOWN_CUT
    assert reason(backbone="resnet") is Reject.UNKNOWN_BACKBONE
    assert reason(local_epochs=None) is Reject.MISSING_FIELD
    with pytest.raises(CodecError) as info:
        codec.encode_round_broadcast(replace(make_broadcast(), tensors={}))
    assert info.value.reason is Reject.MISSING_FIELD


def test_fuzz_mutated_round_records_raise_only_codec_errors() -> None:
    rng = random.Random(5)
    samples = [
        (codec.encode_round_update(make_round_update()), codec.decode_round_update),
        (codec.encode_round_broadcast(make_broadcast()), codec.decode_round_broadcast),
    ]
    for data, decode in samples:
        for _ in range(400):
            mutated = bytearray(data)
            for _ in range(rng.randint(1, 4)):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            with contextlib.suppress(CodecError):
                decode(bytes(mutated))
