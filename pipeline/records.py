"""The records every actor exchanges: the contract between devices, agents, trainers and
the model server. Pure data; ``pipeline.codec`` is the only module that knows their bytes.
"""

from __future__ import annotations

import enum
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from pipeline.errors import FedexError


def same_values(a: object, b: object) -> bool:
    """Value equality of two records of one dataclass type, field by field, with arrays and
    tensor maps compared by value (a dataclass's ``==`` cannot compare arrays)."""
    if not is_dataclass(a) or isinstance(a, type):
        raise TypeError(f"same_values compares dataclass records, not {type(a).__name__}")
    return type(a) is type(b) and all(
        _same(getattr(a, f.name), getattr(b, f.name)) for f in fields(a)
    )


def _same(x: object, y: object) -> bool:
    if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
        return (
            isinstance(x, np.ndarray)
            and isinstance(y, np.ndarray)
            and x.shape == y.shape
            and bool(np.array_equal(x, y, equal_nan=x.dtype.kind == "f"))
        )
    if isinstance(x, Mapping) and isinstance(y, Mapping):
        return list(x) == list(y) and all(_same(x[k], y[k]) for k in x)
    return bool(x == y)


class Cut(enum.StrEnum):
    """Freeze level (paper's Table 1): how far the device runs the backbone."""

    FULL = "full"
    FREEZE1 = "freeze1"
    FREEZE2 = "freeze2"
    FREEZE3 = "freeze3"
    FREEZE4 = "freeze4"
    FREEZE5 = "freeze5"
    FREEZE6 = "freeze6"


class Backbone(enum.StrEnum):
    """Backbones the zoo can split. MobileNetV2 is the small one for fast tests and fleets."""

    INCEPTION_RESNET_V1 = "inception_resnet_v1"
    MOBILENET_V2 = "mobilenet_v2"


class FeatureDType(enum.StrEnum):
    """Element type of pushed feature tensors. float16 halves the bytes of a push."""

    FLOAT16 = "float16"
    FLOAT32 = "float32"

    @property
    def numpy(self) -> np.dtype[np.floating]:
        return np.dtype("<f2") if self is FeatureDType.FLOAT16 else np.dtype("<f4")


class TriggerReason(enum.StrEnum):
    COUNT = "count"
    AGE = "age"
    MANUAL = "manual"
    RETRY = "retry"


#: Input resolution every backbone is fed (facenet's 160×160 crops).
IMAGE_SIZE = 160

#: Feature shape at each cut, as produced by the real backbone prefix in ``pipeline.zoo``
#: (a unit test runs the prefixes and checks this table). Pure data so that the codec can
#: validate pushes without importing torch.
FEATURE_SHAPES: dict[Backbone, dict[Cut, tuple[int, ...]]] = {
    Backbone.INCEPTION_RESNET_V1: {
        Cut.FULL: (3, IMAGE_SIZE, IMAGE_SIZE),
        Cut.FREEZE1: (64, 38, 38),
        Cut.FREEZE2: (256, 17, 17),
        Cut.FREEZE3: (256, 17, 17),
        Cut.FREEZE4: (896, 8, 8),
        Cut.FREEZE5: (1792,),
        Cut.FREEZE6: (512,),
    },
    Backbone.MOBILENET_V2: {
        Cut.FULL: (3, IMAGE_SIZE, IMAGE_SIZE),
        Cut.FREEZE1: (16, 80, 80),
        Cut.FREEZE2: (24, 40, 40),
        Cut.FREEZE3: (32, 20, 20),
        Cut.FREEZE4: (96, 10, 10),
        Cut.FREEZE5: (1280,),
        Cut.FREEZE6: (512,),
    },
}


def feature_shape(backbone: Backbone, cut: Cut) -> tuple[int, ...]:
    return FEATURE_SHAPES[backbone][cut]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True, eq=False)
class FeaturePush:
    """One device's batch of feature+label samples, columnar.

    ``sample_ids`` are unique per device (dedupe key = device_id + sample_id);
    ``features`` has shape ``(n, *feature_shape(backbone, cut))`` and dtype ``dtype``.
    Decoded pushes hold read-only views into the message bytes (no copy).
    """

    model_id: str
    device_id: str
    backbone: Backbone
    cut: Cut
    dtype: FeatureDType
    sample_ids: npt.NDArray[np.uint64]
    labels: npt.NDArray[np.int32]
    timestamps_ms: npt.NDArray[np.int64]
    features: npt.NDArray[np.floating]

    @property
    def n(self) -> int:
        return int(self.sample_ids.shape[0])

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.features.shape[1:])

    def same_as(self, other: FeaturePush) -> bool:
        """Value equality, arrays included (dataclass ``==`` cannot compare arrays)."""
        return same_values(self, other)


@dataclass(frozen=True, slots=True)
class OffsetRange:
    """Feature-log records ``[start, end)`` of one partition."""

    partition: int
    start: int
    end: int

    @property
    def count(self) -> int:
        return self.end - self.start


#: ``<model_id>:<seq>``, seq = 1, 2, … (the agents number a model's triggers).
_TRIGGER_ID = re.compile(r"(?P<model>.+):(?P<seq>[1-9][0-9]*)")


class RecordError(FedexError):
    """A record's field breaks the contract (e.g. a trigger id not of its form)."""


def version_for_trigger(trigger_id: str, model_id: str | None = None) -> str:
    """``<model_id>:<seq>`` → ``v<seq>``: a redelivered or re-fired trigger maps to the same
    version, which is what makes training jobs idempotent.

    With ``model_id`` the trigger id must name that model. Raises :class:`RecordError`
    for an id not of that form.
    """
    match = _TRIGGER_ID.fullmatch(trigger_id)
    if match is None:
        raise RecordError(
            f"trigger id {trigger_id!r} is not <model_id>:<seq> with seq = 1, 2, …; "
            "versions derive from it"
        )
    if model_id is not None and match["model"] != model_id:
        raise RecordError(f"trigger id {trigger_id!r} does not belong to model {model_id!r}")
    return f"v{int(match['seq'])}"


@dataclass(frozen=True, slots=True)
class TrainingTrigger:
    """Asks a trainer to train ``model_id`` on the feature-log ranges it names.

    ``trigger_id`` is the idempotency key: the model version trained for it derives
    from it, so a redelivered trigger never yields a second version.
    """

    model_id: str
    trigger_id: str
    ranges: tuple[OffsetRange, ...]
    sample_count: int
    reason: TriggerReason
    base_version: str | None = None
    attempt: int = 1
    created_at_ms: int = field(default_factory=now_ms)


@dataclass(frozen=True, slots=True)
class ModelMetrics:
    """Validation of challenger and champion on the same set, and the training cost.

    ``train_samples`` and ``val_samples`` split the trigger's new samples (first copies in
    its ranges) into trained and held out for validation; ``replay_samples`` are samples of
    earlier jobs trained again next to them; ``eval_samples`` is the size of the model's
    validation set both accuracies were measured on (0 in updates from before it existed).
    """

    val_accuracy: float
    champion_val_accuracy: float | None
    train_samples: int
    val_samples: int
    train_seconds: float
    epochs: int
    replay_samples: int = 0
    eval_samples: int = 0


@dataclass(frozen=True, slots=True)
class ModelUpdate:
    """Announces a new checkpoint of ``model_id`` on the model topic.

    ``checkpoint`` carries the safetensors blob inline when it fits under the model
    topic's max message size; otherwise it is None and ``checkpoint_uri`` points to the
    model server. ``sha256`` and ``size`` always describe the blob.
    """

    model_id: str
    version: str
    parent_version: str | None
    trigger_id: str | None
    backbone: Backbone
    cut: Cut
    num_classes: int
    checkpoint_uri: str
    sha256: str
    size: int
    encoding: str
    metrics: ModelMetrics
    is_best: bool
    created_at_ms: int = field(default_factory=now_ms)
    checkpoint: bytes | None = None
    #: The feature-log ranges of the trigger this version trained (empty for a base
    #: version): a trigger id has one set of ranges forever, and this is where it is kept.
    trigger_ranges: tuple[OffsetRange, ...] = ()


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A record that could not be processed, kept whole with where it came from and why."""

    original: bytes
    topic: str
    partition: int
    offset: int
    reason: str
    message: str
    key: bytes | None = None
    at_ms: int = field(default_factory=now_ms)

    @classmethod
    def of(
        cls, record: Consumed, *, reason: str, message: str, at_ms: int | None = None
    ) -> DeadLetter:
        """The dead letter of a consumed record: its bytes, origin and why it was refused."""
        return cls(
            original=bytes(record.value or b""),
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            reason=reason,
            message=message,
            key=record.key,
            at_ms=now_ms() if at_ms is None else at_ms,
        )


class Consumed(Protocol):
    """What a dead letter keeps of a consumed record (an aiokafka ``ConsumerRecord``, the
    agents' ``Record``)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...


# ------------------------------------------------------------- FedAvg baseline (issue 5)
#
# The baseline FedEx is measured against: devices train the same thawed layers locally and
# exchange tensors with a server every round. Not part of the product's flow.

#: Named tensors of a head (its floating state entries), row-major, one dtype.
TensorMap = Mapping[str, npt.NDArray[np.floating]]


class UpdateKind(enum.StrEnum):
    """What a device's tensors are. ``delta`` = local weights after E local epochs minus the
    round's global weights (FedAvg); ``gradient`` = the loss gradient at the global weights
    (FedSGD)."""

    DELTA = "delta"
    GRADIENT = "gradient"


@dataclass(frozen=True, slots=True, eq=False)
class RoundBroadcast:
    """The server's global head for round ``round`` of FedAvg run ``run_id``, and the
    devices asked to train on it with which local recipe. An empty ``selected`` is the
    final model of the run (nobody trains on it)."""

    model_id: str
    run_id: str
    round: int
    backbone: Backbone
    cut: Cut
    num_classes: int
    selected: tuple[str, ...]
    local_epochs: int
    batch_size: int
    lr: float
    deadline_ms: int
    dtype: FeatureDType
    tensors: TensorMap
    created_at_ms: int = field(default_factory=now_ms)

    def same_as(self, other: RoundBroadcast) -> bool:
        """Value equality, tensors included."""
        return same_values(self, other)


@dataclass(frozen=True, slots=True, eq=False)
class RoundUpdate:
    """One device's contribution to round ``round`` of run ``run_id``: its tensors (same
    names and shapes as the broadcast's) computed on ``sample_count`` local samples."""

    model_id: str
    run_id: str
    round: int
    device_id: str
    sample_count: int
    kind: UpdateKind
    dtype: FeatureDType
    tensors: TensorMap
    loss: float | None = None
    created_at_ms: int = field(default_factory=now_ms)

    def same_as(self, other: RoundUpdate) -> bool:
        """Value equality, tensors included."""
        return same_values(self, other)


# ------------------------------------------------------------ agents: batch summary
#
# Internal to the aggregation agents (their ingest stage → their Faust agent); not a
# record other actors consume.


@dataclass(frozen=True, slots=True, eq=False)
class BatchSummary:
    """The valid pushes of one feature-log partition in one ingest batch, without their
    features: what the aggregation agents count.

    One entry per push, columnar and in log order: its feature-log ``offsets`` (strictly
    increasing), its model (``model_index`` into ``models``), its ``samples``, its log time
    (``times_ms``) and its device (``device_index`` into ``devices``). Per-push entries, not
    one range per model, let the counting side skip exactly the pushes it already counted
    when a summary is replayed with other batch boundaries.
    """

    partition: int
    models: tuple[str, ...]
    model_index: npt.NDArray[np.int32]
    offsets: npt.NDArray[np.int64]
    samples: npt.NDArray[np.int32]
    times_ms: npt.NDArray[np.int64]
    device_index: npt.NDArray[np.int32]
    devices: tuple[str, ...]

    @property
    def n(self) -> int:
        return int(self.offsets.shape[0])

    @property
    def sample_count(self) -> int:
        return int(self.samples.sum())

    def same_as(self, other: BatchSummary) -> bool:
        """Value equality, arrays included."""
        return same_values(self, other)
