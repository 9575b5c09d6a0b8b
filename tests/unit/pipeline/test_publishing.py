"""Publishing without Kafka: version naming, inline vs by-reference by size, the update
describes the stored blob, keys and partitions of the model topic."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from aiokafka.partitioner import DefaultPartitioner

from pipeline import codec
from pipeline.checkpoints import (
    CheckpointDType,
    LocalCheckpointStore,
    checkpoint_uri,
    decode_checkpoint,
    sha256_hex,
)
from pipeline.download import checkpoint_url
from pipeline.publishing import (
    BASE_VERSION,
    INLINE_HEADROOM,
    PublishError,
    PublishTarget,
    VersionSpec,
    base_metrics,
    build_base_update,
    build_update,
    checkpoint_dtype,
    fits_inline,
    model_partition,
    publish_update,
    update_key,
)
from pipeline.records import (
    Backbone,
    Cut,
    ModelMetrics,
    ModelUpdate,
    RecordError,
    version_for_trigger,
)

SERVER = "http://models.example:8080/"
MIB = 1024 * 1024


def head_state(classes: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "logits.weight": torch.randn(classes, 512, generator=generator),
        "logits.bias": torch.randn(classes, generator=generator),
    }


def build(
    store: LocalCheckpointStore,
    classes: int,
    max_bytes: int,
    *,
    dtype: str = "float16",
    created_at_ms: int | None = None,
) -> ModelUpdate:
    """``faces-1``'s v3 over ``classes`` classes, under a ``max_bytes`` message limit."""
    return build_update(
        VersionSpec(
            model_id="faces-1",
            version="v3",
            backbone=Backbone.INCEPTION_RESNET_V1,
            cut=Cut.FREEZE6,
            num_classes=classes,
            parent_version="v2",
            trigger_id="faces-1:3",
        ),
        PublishTarget(store, SERVER, max_bytes, dtype),
        head_state(classes),
        metrics=ModelMetrics(0.9, 0.5, 900, 100, 1.5, 5),
        is_best=True,
        created_at_ms=created_at_ms,
    )


# --------------------------------------------------------------------------- naming


@pytest.mark.parametrize(
    ("trigger_id", "version"),
    [("faces-1:1", "v1"), ("faces-1:42", "v42"), ("team:faces:7", "v7")],
)
def test_version_derives_from_the_trigger_id(trigger_id: str, version: str) -> None:
    assert version_for_trigger(trigger_id) == version
    assert version_for_trigger(trigger_id, trigger_id.rpartition(":")[0]) == version


@pytest.mark.parametrize("trigger_id", ["faces-1", "faces-1:0", "faces-1:x", ":3", "faces-1:03"])
def test_trigger_ids_not_of_the_form_are_refused(trigger_id: str) -> None:
    with pytest.raises(RecordError, match="<model_id>:<seq>"):
        version_for_trigger(trigger_id)


def test_trigger_of_another_model_is_refused() -> None:
    with pytest.raises(RecordError, match="does not belong"):
        version_for_trigger("cats-2:4", "faces-1")


def test_keys_urls_and_partitions() -> None:
    assert str(checkpoint_url(SERVER, "faces-1", "v3")) == (
        "http://models.example:8080/v1/models/faces-1/checkpoints/v3"
    )
    assert update_key("faces-1", "v3") == b"faces-1/v3"
    assert codec.decode_update_key(update_key("faces-1", "v3")) == ("faces-1", "v3")
    for model in ("faces-1", "cats-2", "a", "model.with.dots"):
        key = codec.encode_key(model)
        # The partition Kafka's default partitioner gives the model id: pushes and triggers
        # of the model land there too.
        assert model_partition(model, 6) == DefaultPartitioner()(key, list(range(6)), [])
    with pytest.raises(PublishError):
        model_partition("faces-1", 0)


def test_checkpoint_dtype_reads_settings_spelling() -> None:
    assert checkpoint_dtype("float16") is CheckpointDType.FP16
    assert checkpoint_dtype("float32") is CheckpointDType.FP32
    assert checkpoint_dtype("fp32") is CheckpointDType.FP32
    with pytest.raises(PublishError, match="float16 or float32"):
        checkpoint_dtype("int8")


# --------------------------------------------------------------------------- inline or not


def test_small_checkpoint_travels_inline_and_matches_the_store(tmp_path: Path) -> None:
    store = LocalCheckpointStore(tmp_path)
    update = build(store, classes=100, max_bytes=8 * MIB)
    blob = store.get(checkpoint_uri("faces-1", "v3"))
    assert update.checkpoint == blob
    assert update.sha256 == sha256_hex(blob) and update.size == len(blob)
    assert update.checkpoint_uri == str(checkpoint_url(SERVER, "faces-1", "v3"))
    assert update.encoding == "safetensors-fp16"
    assert (update.version, update.parent_version, update.trigger_id) == ("v3", "v2", "faces-1:3")
    state, meta = decode_checkpoint(blob, expected_sha256=update.sha256)
    assert state["logits.weight"].dtype == torch.float16 and meta["fedex.dtype"] == "fp16"
    decoded = codec.decode_update(codec.encode_update(update))
    assert decoded.checkpoint == blob and decoded.metrics == update.metrics


def test_large_checkpoint_goes_by_reference(tmp_path: Path) -> None:
    store = LocalCheckpointStore(tmp_path)
    # 2,000 classes x 513 x fp16 ≈ 2 MB: over a 1 MiB topic.
    update = build(store, classes=2000, max_bytes=MIB)
    blob = store.get(checkpoint_uri("faces-1", "v3"))
    assert update.checkpoint is None
    assert update.size == len(blob) > MIB and update.sha256 == sha256_hex(blob)
    encoded = codec.encode_update(update)
    assert len(encoded) < 4096
    assert codec.decode_update(encoded).checkpoint is None


def test_inline_decision_is_by_encoded_size_with_headroom(tmp_path: Path) -> None:
    store = LocalCheckpointStore(tmp_path)
    probe = build(store, classes=50, max_bytes=64 * MIB)
    assert probe.checkpoint is not None
    size = len(codec.encode_update(probe))
    at_limit = build(
        store, classes=50, max_bytes=size + INLINE_HEADROOM, created_at_ms=probe.created_at_ms
    )
    assert at_limit.checkpoint is not None
    over = build(
        store, classes=50, max_bytes=size + INLINE_HEADROOM - 1, created_at_ms=probe.created_at_ms
    )
    assert over.checkpoint is None and over.sha256 == probe.sha256
    assert fits_inline(probe, size, headroom=0) and not fits_inline(probe, size - 1, headroom=0)


def test_fp32_checkpoints(tmp_path: Path) -> None:
    update = build(LocalCheckpointStore(tmp_path), classes=10, max_bytes=8 * MIB, dtype="float32")
    assert update.encoding == "safetensors-fp32"
    assert update.checkpoint is not None
    state, _ = decode_checkpoint(update.checkpoint)
    assert state["logits.bias"].dtype == torch.float32
    assert torch.equal(state["logits.bias"], head_state(10)["logits.bias"])


# --------------------------------------------------------------------------- base model


def base_update(store: LocalCheckpointStore, **kw: Any) -> ModelUpdate:
    """``faces-1``'s base version (v0) over 10 classes, under an 8 MiB message limit."""
    return build_base_update(
        PublishTarget(store, SERVER, 8 * MIB),
        VersionSpec.in_chain("faces-1", 0, "inception_resnet_v1", "freeze6", 10),
        **kw,
    )


def test_base_update_is_v0_best_without_parent(tmp_path: Path) -> None:
    store = LocalCheckpointStore(tmp_path)
    given = base_update(store, head_state=head_state(10))
    assert given.version == BASE_VERSION == "v0"
    assert given.is_best and given.parent_version is None and given.trigger_id is None
    assert given.metrics == base_metrics()
    assert store.get(checkpoint_uri("faces-1", "v0")) == given.checkpoint


def test_random_base_head_is_the_zoos_and_deterministic_in_the_seed(tmp_path: Path) -> None:
    def base(seed: int) -> ModelUpdate:
        return base_update(LocalCheckpointStore(tmp_path / str(seed)), seed=seed)

    a, b, c = base(1), base(1), base(2)
    assert a.sha256 == b.sha256 != c.sha256
    assert a.checkpoint is not None
    state, _ = decode_checkpoint(a.checkpoint, expected_sha256=a.sha256)
    assert set(state) == {"logits.weight", "logits.bias"}
    assert state["logits.weight"].shape == (10, 512)


# --------------------------------------------------------------------------- publishing


class FakeProducer:
    def __init__(self, partitions: int) -> None:
        self.partitions = set(range(partitions))
        self.sent: list[dict[str, Any]] = []

    async def partitions_for(self, topic: str) -> set[int]:
        return self.partitions

    async def send_and_wait(self, topic: str, value: bytes, *, key: bytes, partition: int) -> str:
        self.sent.append({"topic": topic, "value": value, "key": key, "partition": partition})
        return "ack"


async def test_publish_sends_to_the_models_partition_and_awaits_the_ack(tmp_path: Path) -> None:
    update = build(LocalCheckpointStore(tmp_path), classes=10, max_bytes=8 * MIB)
    producer = FakeProducer(6)
    assert await publish_update(producer, "p.models", update) == "ack"  # type: ignore[arg-type]
    (sent,) = producer.sent
    assert sent["topic"] == "p.models" and sent["key"] == b"faces-1/" + update.version.encode()
    # Keyed by version, yet on the model's partition (where its pushes and triggers are).
    assert sent["partition"] == model_partition("faces-1", 6)
    assert codec.decode_update(sent["value"]) == dataclasses.replace(update)
    with pytest.raises(PublishError, match="no partitions"):
        await publish_update(FakeProducer(0), "p.models", update)  # type: ignore[arg-type]


def test_a_chain_version_names_its_parent_and_the_trigger_that_made_it(tmp_path: Path) -> None:
    base = VersionSpec.in_chain("faces-1", 0, "inception_resnet_v1", "freeze6", 10)
    assert (base.version, base.parent_version, base.trigger_id) == ("v0", None, None)
    third = VersionSpec.in_chain("faces-1", 3, "inception_resnet_v1", "freeze6", 10)
    assert (third.version, third.parent_version, third.trigger_id) == ("v3", "v2", "faces-1:3")
    assert version_for_trigger(third.trigger_id, "faces-1") == third.version
    target = PublishTarget(LocalCheckpointStore(tmp_path), SERVER, 8 * MIB)
    with pytest.raises(PublishError, match="not a base version"):
        build_base_update(target, third)
