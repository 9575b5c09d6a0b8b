"""Publishing model versions: a head's state dict → checkpoint blob → store → model topic.

Shared by the trainer (every trained version) and the device simulator / CLI (the base
model, ``v0``). One function decides how a checkpoint travels (:func:`build_update`, given
what the version is, a :class:`VersionSpec`, and where it goes, a :class:`PublishTarget`):
inline in the update when the encoded update fits under the model topic's
``max.message.bytes`` with headroom for the record framing, else by reference to the model
server (``<server_url>/v1/models/<id>/checkpoints/<version>``). Either way the blob is put
in the checkpoint store first, so the model server can serve it and a trainer can
warm-start from it, and the update's ``sha256`` / ``size`` describe exactly that blob.

Updates are keyed ``<model_id>/<version>`` (docs/architecture.md), so compaction of the
model topic keeps every version, and sent explicitly to the model's partition, the one
that also carries its pushes and triggers (Kafka's default murmur2 partitioner on the model
id; :func:`model_partition` computes it), so a model's updates stay in order there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

from pipeline import codec
from pipeline.checkpoints import (
    CheckpointDType,
    CheckpointStore,
    LocalCheckpointStore,
    encode_checkpoint,
    sha256_hex,
)
from pipeline.download import checkpoint_url
from pipeline.errors import FedexError
from pipeline.records import Backbone, Cut, ModelMetrics, ModelUpdate, now_ms
from pipeline.registry import RegistryFollower

if TYPE_CHECKING:
    from aiokafka import AIOKafkaProducer
    from aiokafka.structs import RecordMetadata
    from torch import Tensor

    from pipeline.settings import Settings

#: Version of the base model every model starts from.
BASE_VERSION: Final = "v0"

#: Bytes kept free under the topic's max.message.bytes for the record batch framing
#: (batch header, record header, key) when deciding to send a checkpoint inline.
INLINE_HEADROOM: Final = 64 * 1024


class PublishError(FedexError):
    """A model update could not be built or published; the message says why."""


# --------------------------------------------------------------------------- naming


def update_key(model_id: str, version: str) -> bytes:
    """Kafka key of a model update: ``<model_id>/<version>``. The model topic is compacted,
    and a key per model would let compaction drop every version but the latest, the best
    one included, so a late-joining registry could no longer find it. The key no longer
    picks the partition: :func:`publish_update` sends to :func:`model_partition`. Readers
    also accept the older key, the model id alone (``codec.decode_update_key``)."""
    return codec.encode_update_key(model_id, version)


def model_partition(model_id: str, partitions: int) -> int:
    """The partition Kafka's default partitioner picks for key ``model_id`` (the same one
    the model's pushes and triggers land on when topics have equal partition counts)."""
    from aiokafka.partitioner import murmur2

    if partitions < 1:
        raise PublishError(f"a topic needs at least one partition, got {partitions}")
    return (murmur2(codec.encode_key(model_id)) & 0x7FFFFFFF) % partitions


def checkpoint_dtype(value: str | CheckpointDType) -> CheckpointDType:
    """``settings.checkpoint_dtype`` (``float16`` / ``float32``) as a :class:`CheckpointDType`."""
    aliases = {"float16": CheckpointDType.FP16, "float32": CheckpointDType.FP32}
    if isinstance(value, str) and value in aliases:
        return aliases[value]
    try:
        return CheckpointDType(value)
    except ValueError:
        raise PublishError(
            f"checkpoint dtype {value!r} is unknown; use float16 or float32"
        ) from None


# --------------------------------------------------------------------------- building


def fits_inline(
    update: ModelUpdate, max_message_bytes: int, headroom: int = INLINE_HEADROOM
) -> bool:
    """Whether ``update`` encoded with its blob inline fits the model topic."""
    return len(codec.encode_update(update)) <= max_message_bytes - headroom


@dataclasses.dataclass(frozen=True, slots=True)
class VersionSpec:
    """What a model version is, apart from its weights and metrics: its identity, its
    lineage and the head shape its checkpoint fits. One value per version, so the trainer,
    the base model and the benches describe a version the same way."""

    model_id: str
    version: str
    backbone: Backbone | str
    cut: Cut | str
    num_classes: int
    parent_version: str | None = None
    trigger_id: str | None = None

    @classmethod
    def in_chain(
        cls, model_id: str, seq: int, backbone: Backbone | str, cut: Cut | str, num_classes: int
    ) -> VersionSpec:
        """Version ``v<seq>`` of a model whose versions follow one another: each trained by
        trigger ``<model_id>:<seq>`` (:func:`~pipeline.records.version_for_trigger`) from
        the one before; ``v0``, the base, has neither parent nor trigger."""
        return cls(
            model_id=model_id,
            version=f"v{seq}",
            backbone=backbone,
            cut=cut,
            num_classes=num_classes,
            parent_version=f"v{seq - 1}" if seq else None,
            trigger_id=f"{model_id}:{seq}" if seq else None,
        )


@dataclasses.dataclass(frozen=True, slots=True)
class PublishTarget:
    """Where and how a version's checkpoint goes: the store that keeps the blob, the model
    server that serves it by reference, and the limits that decide inline or by reference.
    Fixed for a process, unlike :class:`VersionSpec`."""

    store: CheckpointStore
    server_url: str
    max_message_bytes: int
    dtype: CheckpointDType | str = CheckpointDType.FP16
    headroom: int = INLINE_HEADROOM

    @classmethod
    def from_settings(
        cls, settings: Settings, store: CheckpointStore | None = None
    ) -> PublishTarget:
        """The process's target: ``store`` (default: the local store at
        ``settings.checkpoint_dir``) and the settings' server, message limit and dtype."""
        return cls(
            store=store or LocalCheckpointStore(settings.checkpoint_dir),
            server_url=settings.server_url,
            max_message_bytes=settings.max_message_bytes,
            dtype=settings.checkpoint_dtype,
        )


def build_update(
    spec: VersionSpec,
    target: PublishTarget,
    state_dict: Mapping[str, Tensor],
    *,
    metrics: ModelMetrics,
    is_best: bool,
    created_at_ms: int | None = None,
) -> ModelUpdate:
    """Encode a head's state dict (safetensors, ``target.dtype``), put the blob in
    ``target.store``, and return the update announcing ``spec``, inline when it fits (see
    the module docstring).

    Putting the blob is idempotent per (model, version): a retried job overwrites its own
    version's blob before announcing it.
    """
    dtype = checkpoint_dtype(target.dtype)
    # No extra safetensors metadata: the update carries it, and safetensors writes metadata
    # in hash-map order, so more than one key would make equal heads differ in sha256.
    blob = encode_checkpoint(state_dict, dtype=dtype)
    target.store.put(spec.model_id, spec.version, blob)
    update = ModelUpdate(
        model_id=spec.model_id,
        version=spec.version,
        parent_version=spec.parent_version,
        trigger_id=spec.trigger_id,
        backbone=Backbone(spec.backbone),
        cut=Cut(spec.cut),
        num_classes=spec.num_classes,
        checkpoint_uri=str(checkpoint_url(target.server_url, spec.model_id, spec.version)),
        sha256=sha256_hex(blob),
        size=len(blob),
        encoding=dtype.encoding,
        metrics=metrics,
        is_best=is_best,
        created_at_ms=created_at_ms if created_at_ms is not None else now_ms(),
        checkpoint=blob,
    )
    if fits_inline(update, target.max_message_bytes, target.headroom):
        return update
    return dataclasses.replace(update, checkpoint=None)


def base_metrics() -> ModelMetrics:
    """Metrics of a base model nobody validated here (trained elsewhere or random)."""
    return ModelMetrics(
        val_accuracy=0.0,
        champion_val_accuracy=None,
        train_samples=0,
        val_samples=0,
        train_seconds=0.0,
        epochs=0,
    )


def random_head_state(
    backbone: Backbone | str, cut: Cut | str, num_classes: int, *, seed: int = 0
) -> dict[str, Tensor]:
    """The zoo's deterministic random initialisation of the head at ``cut``."""
    from pipeline.zoo import build_backbone, head_state_dict, split

    model = build_backbone(backbone, num_classes=num_classes, seed=seed)
    return head_state_dict(split(model, backbone, cut).head)


def build_base_update(
    target: PublishTarget,
    spec: VersionSpec,
    *,
    head_state: Mapping[str, Tensor] | None = None,
    seed: int = 0,
    metrics: ModelMetrics | None = None,
) -> ModelUpdate:
    """The base model ``v0`` (``spec``, from :meth:`VersionSpec.in_chain` at 0): best by
    definition, no parent, no trigger. Its head is ``head_state`` (e.g. a pretrained
    classifier) or the zoo's random init for ``seed``."""
    if (spec.version, spec.parent_version, spec.trigger_id) != (BASE_VERSION, None, None):
        raise PublishError(
            f"{spec.model_id} {spec.version} is not a base version: build it with build_update"
        )
    state = (
        head_state
        if head_state is not None
        else random_head_state(spec.backbone, spec.cut, spec.num_classes, seed=seed)
    )
    return build_update(
        spec,
        target,
        state,
        metrics=metrics or base_metrics(),
        is_best=True,
    )


# --------------------------------------------------------------------------- publishing


async def publish_update(
    producer: AIOKafkaProducer, topic: str, update: ModelUpdate
) -> RecordMetadata:
    """Send ``update`` to the model topic and return once the broker acknowledged it
    (``acks=all`` producers: durable). Callers commit their input only after this."""
    partitions = await producer.partitions_for(topic)
    if not partitions:
        raise PublishError(f"model topic {topic!r} has no partitions: run `fedex topics ensure`")
    # Explicit partition: the key (model id and version) would hash elsewhere.
    return await producer.send_and_wait(
        topic,
        codec.encode_update(update),
        key=update_key(update.model_id, update.version),
        partition=model_partition(update.model_id, len(partitions)),
    )


def make_update_producer(
    settings: Settings, *, client_id: str = "fedex-publisher"
) -> AIOKafkaProducer:
    """An unstarted producer able to carry the largest inline update."""
    from pipeline.clients import MIB, make_producer

    return make_producer(
        bootstrap=settings.bootstrap,
        client_id=client_id,
        max_request_size=settings.max_message_bytes + MIB,
    )


async def register_model(
    settings: Settings,
    model_id: str,
    backbone: Backbone | str,
    cut: Cut | str,
    num_classes: int,
    head_state: Mapping[str, Tensor] | None = None,
    seed: int = 0,
    *,
    store: CheckpointStore | None = None,
    metrics: ModelMetrics | None = None,
    exist_ok: bool = False,
    check_timeout: float = 30.0,
) -> ModelUpdate:
    """Bring ``model_id`` into being: publish its base model ``v0`` and return that update.

    Reads the model topic first: a model that already exists is an error, or with
    ``exist_ok`` its existing ``v0`` (as the registry keeps it, without the blob) is
    returned and nothing is published. The blob goes to ``store`` (default: the local
    store at ``settings.checkpoint_dir``).
    """
    from pipeline.topics import Topics

    topic = Topics(settings.topic_prefix).models
    async with RegistryFollower(
        bootstrap=settings.bootstrap, topic=topic, client_id="fedex-register"
    ) as follower:
        await follower.wait_caught_up(check_timeout)
        entry = follower.registry.get(model_id)
    if entry is not None:
        existing = entry.version(BASE_VERSION) or entry.history[0]
        if exist_ok:
            return existing
        raise PublishError(
            f"model {model_id!r} already exists ({entry.backbone}/{entry.cut}, "
            f"{entry.num_classes} classes, {len(entry.history)} versions); pick another id"
        )
    update = build_base_update(
        PublishTarget.from_settings(settings, store),
        VersionSpec.in_chain(model_id, 0, backbone, cut, num_classes),
        head_state=head_state,
        seed=seed,
        metrics=metrics,
    )
    producer = make_update_producer(settings, client_id="fedex-register")
    await producer.start()
    try:
        await publish_update(producer, topic, update)
    finally:
        await producer.stop()
    return update
