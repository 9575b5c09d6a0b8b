"""The pure pieces of ``fedex bench push``: push bytes per freeze level, tier pricing,
timing summaries and the FedAvg gradient record's size."""

from __future__ import annotations

import math

import numpy as np
import pytest

from device_sim.network import TIERS
from lab.push_bench import (
    LEVELS,
    PAPER_FEDAVG_PUSH_S,
    PAPER_PULL_S,
    PAPER_PUSH_S,
    bench_push,
    expected_push_bytes,
    gradient_record_bytes,
    mobile_tiers,
    price,
    summarize,
    tier_table,
)
from pipeline import codec
from pipeline.records import FEATURE_SHAPES, Backbone, Cut, FeatureDType


@pytest.mark.parametrize("cut", LEVELS)
def test_push_bytes_follow_the_codec_and_the_feature_shape(cut: Cut) -> None:
    push = bench_push(cut, num_classes=100)
    data = codec.encode_push(push)
    meta_len = codec.HEADER.unpack_from(data, 0)[4]
    assert len(data) == expected_push_bytes(cut, meta_bytes=meta_len)
    # Independently of push_layout: 10 fp16 feature tensors, 8-byte ids and timestamps,
    # 4-byte labels padded to 8, after the header and metadata padded to 8.
    features = 10 * math.prod(FEATURE_SHAPES[Backbone.INCEPTION_RESNET_V1][cut]) * 2
    header = -(-(codec.HEADER_SIZE + meta_len) // 8) * 8
    assert len(data) == header + 10 * 8 + 10 * 8 + 40 + features
    decoded = codec.decode_push(data, num_classes=100)
    assert decoded.cut is cut and decoded.n == 10 and decoded.features.dtype == np.float16
    assert decoded.model_id == f"bench-push-{cut.value}"


def test_freeze1_push_is_175_times_a_freeze6_push() -> None:
    big = len(codec.encode_push(bench_push(Cut.FREEZE1)))
    small = len(codec.encode_push(bench_push(Cut.FREEZE6)))
    assert 1_848_000 < big < 1_849_000 and 10_000 < small < 11_000
    assert big / small > 170


def test_tier_table_adds_the_simulated_transfer_to_the_loopback_latency() -> None:
    tiers = mobile_tiers()
    up = tier_table(0.01, 1_000_000, tiers, upload=True)
    down = tier_table(0.01, 1_000_000, tiers, upload=False)
    for name, tier in tiers.items():
        assert up[name] == pytest.approx(0.01 + tier.upload_seconds(1_000_000))
        assert down[name] == pytest.approx(0.01 + tier.download_seconds(1_000_000))
    assert up["3g"] > up["lte"] > up["wifi"]  # slower links cost more
    assert down["3g"] < up["3g"]  # a 3G downlink is faster than its uplink
    assert set(up) == {"wifi", "lte", "3g", "2g"} and "loopback" not in up
    assert tiers["lte"] is TIERS["lte"]


def test_summarize_reports_nearest_rank_percentiles() -> None:
    s = summarize([0.5, 0.1, 0.2, 0.3, 0.4])
    assert s == {"p50": 0.3, "p90": 0.5, "min": 0.1, "max": 0.5, "mean": 0.3, "n": 5}
    with pytest.raises(ValueError):
        summarize([])


def test_gradient_record_bytes_are_the_codec_size_of_the_floating_tensors() -> None:
    state = {
        "logits.weight": np.ones((8, 512), dtype=np.float32),
        "logits.bias": np.ones((8,), dtype=np.float32),
        "bn.num_batches_tracked": np.asarray(3, dtype=np.int64),  # stays on the device
    }
    fp32 = gradient_record_bytes(state, FeatureDType.FLOAT32)
    fp16 = gradient_record_bytes(state, FeatureDType.FLOAT16)
    assert 8 * 512 * 4 + 8 * 4 < fp32 < 8 * 512 * 4 + 8 * 4 + 1024
    assert fp16 < fp32 and fp32 - fp16 == 8 * 512 * 2 + 8 * 2


def test_price_puts_the_paper_columns_on_their_rows() -> None:
    timing = {"p50": 0.01, "p90": 0.01, "min": 0.01, "max": 0.01, "mean": 0.01, "n": 1}
    measured = {
        "levels": [
            {"level": c.value, "push_bytes": 1000, "http_s": timing, "kafka_s": timing}
            for c in (Cut.FREEZE1, Cut.FREEZE3, Cut.FREEZE6)
        ],
        "pull": [
            {"level": c.value, "checkpoint_bytes": 10**6, "http_s": timing}
            for c in (Cut.FULL, Cut.FREEZE6)
        ],
        "fedavg": [
            {"level": "freeze6", "dtype": "float32", "bytes": 10**6},
            {"level": "full", "dtype": "float32", "bytes": 10**8},
        ],
    }
    priced = price(measured, mobile_tiers())
    assert [r["paper_s"] for r in priced["levels"]] == [
        PAPER_PUSH_S[Cut.FREEZE1],
        None,
        PAPER_PUSH_S[Cut.FREEZE6],
    ]
    assert [r["paper_s"] for r in priced["pull"]] == [PAPER_PULL_S, None]
    assert [r["paper_s"] for r in priced["fedavg_push"]] == [None, PAPER_FEDAVG_PUSH_S]
    # A FedAvg push is priced as transfer only.
    assert priced["fedavg_push"][1]["tiers_s"]["lte"] == pytest.approx(
        TIERS["lte"].upload_seconds(10**8)
    )
