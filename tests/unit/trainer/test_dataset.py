"""Dataset assembly without Kafka: offsets read once, dedupe, other models skipped, a stable
split; and the trainer's pure job step on an assembled dataset."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from pipeline import codec
from pipeline.records import Backbone, Cut, FeatureDType, FeaturePush, OffsetRange
from pipeline.samples import split_train_val
from trainer.dataset import AddResult, Dataset, FeatureCache, OffsetSet, offset_ranges
from trainer.job import JobError, job_seed, synthetic_dataset, train_candidate
from trainer.recipe import TrainConfig

MODEL = "faces-1"
CLASSES = 10


def push(
    device: str,
    ids: list[int],
    *,
    model_id: str = MODEL,
    value: float | None = None,
    cut: Cut = Cut.FREEZE6,
    dtype: FeatureDType = FeatureDType.FLOAT16,
    labels: list[int] | None = None,
) -> FeaturePush:
    n = len(ids)
    rng = np.random.default_rng(sum(ids) + len(device))
    shape = (512,) if cut is Cut.FREEZE6 else (1792,)
    features = rng.normal(size=(n, *shape)) if value is None else np.full((n, *shape), value)
    return FeaturePush(
        model_id=model_id,
        device_id=device,
        backbone=Backbone.INCEPTION_RESNET_V1,
        cut=cut,
        dtype=dtype,
        sample_ids=np.asarray(ids, dtype=np.uint64),
        labels=np.asarray(labels if labels is not None else [i % CLASSES for i in ids], np.int32),
        timestamps_ms=np.zeros(n, np.int64),
        features=features.astype(dtype.numpy),
    )


def record(p: FeaturePush) -> tuple[bytes, bytes]:
    return codec.encode_key(p.model_id), codec.encode_push(p)


def cache() -> FeatureCache:
    return FeatureCache(MODEL, backbone="inception_resnet_v1", cut="freeze6", num_classes=CLASSES)


# --------------------------------------------------------------------------- offsets


def test_offset_set_merges_and_reports_gaps() -> None:
    held = OffsetSet()
    held.add(0, 0, 5)
    held.add(0, 5, 8)  # adjacent: merges
    held.add(0, 20, 30)
    held.add(0, 10, 12)
    assert held.intervals(0) == [(0, 8), (10, 12), (20, 30)]
    held.add(0, 11, 21)  # bridges two
    assert held.intervals(0) == [(0, 8), (10, 30)]
    assert held.missing(OffsetRange(0, 0, 40)) == [OffsetRange(0, 8, 10), OffsetRange(0, 30, 40)]
    assert held.missing(OffsetRange(0, 2, 6)) == []
    assert held.missing(OffsetRange(1, 2, 6)) == [OffsetRange(1, 2, 6)]
    assert held.contains(0, 7) and not held.contains(0, 8) and held.contains(0, 29)
    held.forget_before(0, 12)
    assert held.intervals(0) == [(12, 30)]


def test_only_offsets_not_held_are_asked_for() -> None:
    c = cache()
    for offset in range(10):
        c.add_record(0, offset, *record(push(f"dev-{offset}", [1, 2])))
    c.mark_read(OffsetRange(0, 0, 12))  # offsets 10 and 11 carried nothing (e.g. markers)
    assert c.missing([OffsetRange(0, 0, 12)]) == []
    assert c.missing([OffsetRange(0, 5, 20), OffsetRange(1, 0, 3)]) == [
        OffsetRange(0, 12, 20),
        OffsetRange(1, 0, 3),
    ]
    # A record handed in twice is not decoded again.
    assert c.add_record(0, 3, *record(push("dev-3", [1, 2]))) is AddResult.ALREADY_HELD
    assert len(c) == 20 and c.stats.already_held == 1


# --------------------------------------------------------------------------- dedupe


def test_duplicate_samples_count_once_first_copy_wins() -> None:
    c = cache()
    assert c.add_record(0, 0, *record(push("dev-a", [1, 2, 3], value=1.0))) is AddResult.ADDED
    # Sample 3 again (a device re-pushed it) plus a new one: only the new one is kept.
    assert c.add_record(0, 1, *record(push("dev-a", [3, 4], value=2.0))) is AddResult.ADDED
    assert c.add_record(0, 2, *record(push("dev-a", [1, 2], value=3.0))) is AddResult.DUPLICATE
    # Same sample id from another device is another sample.
    assert c.add_record(0, 3, *record(push("dev-b", [1], value=4.0))) is AddResult.ADDED
    data = c.select()
    assert sorted(data.keys) == [
        ("dev-a", 1),
        ("dev-a", 2),
        ("dev-a", 3),
        ("dev-a", 4),
        ("dev-b", 1),
    ]
    by_key = dict(zip(data.keys, data.features[:, 0].tolist(), strict=True))
    assert by_key[("dev-a", 3)] == 1.0  # the copy at offset 0
    assert c.stats.duplicate_samples == 3


def test_lowest_offset_wins_whatever_the_read_order() -> None:
    late_first = cache()
    late_first.add_record(0, 7, *record(push("dev-a", [5], value=7.0, labels=[7])))
    late_first.add_record(0, 2, *record(push("dev-a", [5], value=2.0, labels=[2])))
    in_order = cache()
    in_order.add_record(0, 2, *record(push("dev-a", [5], value=2.0, labels=[2])))
    in_order.add_record(0, 7, *record(push("dev-a", [5], value=7.0, labels=[7])))
    for c in (late_first, in_order):
        data = c.select()
        assert len(data) == 1 and float(data.features[0, 0]) == 2.0 and int(data.labels[0]) == 2
        # The sample is in the job whose ranges hold its first copy, and in no other.
        assert len(c.select([OffsetRange(0, 2, 3)])) == 1
        assert len(c.select([OffsetRange(0, 7, 8)])) == 0
        assert len(c.select([OffsetRange(0, 3, 7)])) == 0


# --------------------------------------------------------------------------- filtering


def test_other_models_and_bad_records_are_skipped() -> None:
    c = cache()
    other = push("dev-a", [1, 2], model_id="cats-2")
    assert c.add_record(0, 0, *record(other)) is AddResult.OTHER_MODEL
    # No key (e.g. a kcat producer): decoded, then recognised by its model id.
    assert c.add_record(0, 1, None, codec.encode_push(other)) is AddResult.OTHER_MODEL
    assert (
        c.add_record(0, 2, codec.encode_key(MODEL), b"not a push, only some bytes")
        is AddResult.REJECTED
    )
    wrong_cut = push("dev-a", [1], cut=Cut.FREEZE5)
    assert c.add_record(0, 3, *record(wrong_cut)) is AddResult.REJECTED
    bad_label = push("dev-a", [1], labels=[CLASSES])
    assert c.add_record(0, 4, *record(bad_label)) is AddResult.REJECTED
    assert c.add_record(0, 5, codec.encode_key(MODEL), None) is AddResult.REJECTED
    assert c.add_record(0, 6, *record(push("dev-a", [1]))) is AddResult.ADDED
    assert len(c) == 1
    assert c.stats.other_models == 2
    assert dict(c.stats.rejected) == {
        "bad_magic": 1,
        "model_mismatch": 1,  # the reason the agents dead-letter it with
        "label_out_of_range": 1,
        "tombstone": 1,
    }
    assert c.missing([OffsetRange(0, 0, 7)]) == []  # skipped records are not read again


def test_select_takes_the_job_ranges_and_grows_across_dtypes() -> None:
    c = cache()
    for offset in range(6):
        c.add_record(offset % 2, offset, *record(push(f"dev-{offset}", [offset, offset + 100])))
    c.add_record(0, 10, *record(push("dev-x", [9], dtype=FeatureDType.FLOAT32, value=0.1)))
    assert c.select().features.dtype == np.float32  # widened once for the float32 push
    job = c.select([OffsetRange(0, 2, 5), OffsetRange(1, 0, 2)])
    assert sorted(job.device_ids) == ["dev-1", "dev-1", "dev-2", "dev-2", "dev-4", "dev-4"]
    assert job.features.shape == (6, 512) and job.labels.dtype == np.int64
    all_rows = c.select()
    assert len(all_rows) == 13 and np.shares_memory(all_rows.features, c.select().features)


def test_many_pushes_grow_the_columns() -> None:
    c = cache()
    for offset in range(40):
        c.add_record(
            0,
            offset,
            *record(push(f"dev-{offset % 3}", list(range(offset * 50, offset * 50 + 50)))),
        )
    assert len(c) == 2000
    assert len(set(c.select().keys)) == 2000


def test_forget_before_drops_what_left_the_log() -> None:
    c = cache()
    for offset in range(5):
        c.add_record(0, offset, *record(push("dev-a", [offset], value=float(offset))))
    c.add_record(0, 6, *record(push("dev-a", [1], value=9.0)))  # alias of sample 1
    assert c.forget_before({0: 2}) == 2
    assert sorted(k[1] for k in c.select().keys) == [2, 3, 4]
    assert c.missing([OffsetRange(0, 0, 5)]) == [OffsetRange(0, 0, 2)]
    # Sample 1 is gone with its first copy; a re-read of offset 6 is still known.
    assert c.add_record(0, 6, *record(push("dev-a", [1]))) is AddResult.ALREADY_HELD
    assert c.select([OffsetRange(0, 2, 3)]).features[0, 0] == 2.0


# --------------------------------------------------------------------------- split


def test_split_is_deterministic_and_stable_as_data_grows() -> None:
    c = cache()
    for offset in range(30):
        c.add_record(
            0,
            offset,
            *record(push(f"dev-{offset % 7}", list(range(offset * 20, offset * 20 + 20)))),
        )
    data = c.select()
    train, val = data.split(0.2)
    assert len(train) + len(val) == len(data) == 600
    assert 60 < len(val) < 180
    assert not set(train.keys) & set(val.keys)
    again_train, again_val = c.select().split(0.2)
    assert again_val.keys == val.keys and again_train.keys == train.keys
    # The split is the recipe's, key by key: a sample's side does not depend on its company.
    mask = split_train_val(data.keys, 0.2)
    assert [k for k, m in zip(data.keys, mask, strict=True) if m] == val.keys
    part = c.select([OffsetRange(0, 0, 10)])
    _, part_val = part.split(0.2)
    assert set(part_val.keys) == set(val.keys) & set(part.keys)


def test_offset_ranges_cover_send_results() -> None:
    assert offset_ranges([(1, 5), (0, 3), (1, 9), (0, 4)]) == [
        OffsetRange(0, 3, 5),
        OffsetRange(1, 5, 10),
    ]


# --------------------------------------------------------------------------- the job step


def _linear(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(512, CLASSES)


def test_train_candidate_beats_a_random_champion_on_the_same_split() -> None:
    data = synthetic_dataset(400, CLASSES, seed=3)
    train, val = data.split(0.25)
    champion = {k: v.clone() for k, v in _linear(1).state_dict().items()}
    head = _linear(2)
    cfg = TrainConfig(epochs=8, batch_size=64, lr=1e-2, device="cpu", seed=job_seed(f"{MODEL}:1"))
    candidate = train_candidate(head, champion, train, val, cfg)
    assert candidate.result.losses[-1] < candidate.result.losses[0]
    assert candidate.challenger_accuracy > candidate.champion_accuracy + 0.3
    assert candidate.verdict.is_best
    metrics = candidate.metrics()
    assert metrics.val_samples == len(val) and metrics.train_samples == len(train)
    assert metrics.champion_val_accuracy == candidate.champion_accuracy and metrics.epochs == 8
    # The same trigger retrained gives the same head (seeded shuffles, warm start).
    again = train_candidate(_linear(2), champion, train, val, cfg)
    assert torch.equal(again.state_dict["weight"], candidate.state_dict["weight"])


def test_empty_validation_split_keeps_the_champion() -> None:
    data = synthetic_dataset(40, CLASSES)
    empty = data.take(np.zeros(len(data), dtype=np.bool_))
    champion = dict(_linear(1).state_dict())
    cfg = TrainConfig(epochs=1, batch_size=16, device="cpu")
    candidate = train_candidate(_linear(2), champion, data, empty, cfg)
    assert not candidate.verdict.is_best and math.isnan(candidate.challenger_accuracy)
    assert candidate.metrics().val_accuracy == 0.0 and candidate.metrics().val_samples == 0
    with pytest.raises(JobError, match="no training samples"):
        train_candidate(_linear(2), None, empty, data, cfg)


def test_nothing_to_train_republishes_the_champion_and_keeps_it() -> None:
    """Every new sample held out and nothing to replay: the trigger is still answered (its
    samples are accounted for as validation), with the champion unchanged, not best."""
    data = synthetic_dataset(40, CLASSES)
    empty = data.take(np.zeros(len(data), dtype=np.bool_))
    champion = {k: v.clone() for k, v in _linear(1).state_dict().items()}
    cfg = TrainConfig(epochs=1, batch_size=16, device="cpu")
    candidate = train_candidate(_linear(2), champion, empty, data, cfg, held_out=40)
    assert (
        not candidate.verdict.is_best and "every new sample is held out" in candidate.verdict.reason
    )
    assert torch.equal(candidate.state_dict["weight"], champion["weight"])
    assert candidate.challenger_accuracy == candidate.champion_accuracy
    metrics = candidate.metrics()
    assert (metrics.train_samples, metrics.val_samples, metrics.epochs) == (0, 40, 0)


def test_replayed_samples_are_counted_apart() -> None:
    data = synthetic_dataset(120, CLASSES, seed=5)
    train, val = data.take(np.arange(100)), data.take(np.arange(100, 120))
    cfg = TrainConfig(epochs=1, batch_size=32, device="cpu")
    candidate = train_candidate(
        _linear(2), dict(_linear(1).state_dict()), train, val, cfg, replay_samples=30, held_out=3
    )
    metrics = candidate.metrics()
    assert (metrics.train_samples, metrics.replay_samples) == (70, 30)
    assert (metrics.val_samples, metrics.eval_samples) == (3, 20)
    with pytest.raises(ValueError, match="replay_samples"):
        train_candidate(_linear(2), None, train, val, cfg, replay_samples=101)


def test_job_seed_is_stable() -> None:
    assert job_seed("faces-1:7") == job_seed("faces-1:7") != job_seed("faces-1:8")
    assert isinstance(Dataset, type)
