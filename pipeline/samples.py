"""Which samples a model's feature log holds, and on which side of the split each one is.

Pure, no Kafka and no torch: the rules that the trainer (assembling a job's dataset) and
``fedex audit`` (rebuilding every job from the log) must apply identically.

* :func:`admit_push` is the push-fits-model rule, the one both ways into the feature log
  apply (the model server to a posted body, the agents to a feature-log record): size,
  then the codec, then key/model agreement, then what depends on the model. A refusal is a
  :class:`Refusal` with a reason of :mod:`pipeline.reasons` and a message.
* :func:`accept_push` applies the same rule to a feature-log record as the trainer and
  ``fedex audit`` read it: a push of the model, another model's record, or the reason the
  agents dead-lettered it.
* A sample is identified by ``(device_id, sample_id)``. Devices re-send a push whose
  acknowledgement they did not get, so a sample may be in the log more than once; it
  belongs to the trigger whose ranges hold its *first* occurrence (the lowest
  ``(partition, offset)``), and to no other: every sample is trained in exactly one version.
* :func:`split_train_val` puts a sample in the validation split by a stable hash of its key.
* :class:`ValidationRule` is the trainer's validation rule, whole devices held out as well
  as samples: a sample is validation when its device is a validation device of the model
  (:func:`device_unit_hash` of ``(model_id, device_id)`` below ``val_device_fraction``) or
  its key's hash is below ``val_fraction``. Validation samples are never trained on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import numpy as np
import numpy.typing as npt

from pipeline import codec
from pipeline.reasons import PushReason
from pipeline.records import Backbone, Cut, FeaturePush

if TYPE_CHECKING:
    from pipeline.registry import ModelEntry

#: What :func:`accept_push` returns for a record of another model (not a refusal).
OTHER_MODEL = "other_model"
TOO_LARGE: Final = PushReason.TOO_LARGE.value
TOMBSTONE: Final = PushReason.TOMBSTONE.value
UNKNOWN_MODEL: Final = codec.Reject.UNKNOWN_MODEL.value
MODEL_MISMATCH: Final = codec.Reject.MODEL_MISMATCH.value
LABEL_OUT_OF_RANGE: Final = codec.Reject.LABEL_OUT_OF_RANGE.value
#: The deployment's default push byte limit (``Settings.max_push_bytes``).
DEFAULT_MAX_PUSH_BYTES: Final = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ModelFit:
    """What a push must match to be one of the model's samples. ``max_push_bytes`` None:
    no byte limit."""

    model_id: str
    backbone: Backbone
    cut: Cut
    num_classes: int | None
    max_push_samples: int = codec.DEFAULT_MAX_SAMPLES
    max_push_bytes: int | None = DEFAULT_MAX_PUSH_BYTES

    @classmethod
    def of_entry(
        cls, entry: ModelEntry, *, max_push_samples: int, max_push_bytes: int | None
    ) -> ModelFit:
        """The fit of a registry entry: its latest version's classes (a model may widen)."""
        latest = entry.latest
        return cls(
            entry.model_id,
            entry.backbone,
            entry.cut,
            latest.num_classes if latest is not None else entry.num_classes,
            max_push_samples,
            max_push_bytes,
        )


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a record is not a push its model takes: ``reason`` (one of
    :data:`pipeline.reasons.REASONS`), ``message`` for people, and ``model_id``, the model
    the push claims when its metadata could be read."""

    reason: str
    message: str
    model_id: str | None = None


FitLookup = Callable[[str], ModelFit | None]


def admit_push(
    value: bytes | None,
    *,
    key_model: str | None,
    lookup: FitLookup,
    max_push_bytes: int | None,
    max_push_samples: int,
) -> FeaturePush | Refusal:
    """The decoded push when ``value`` is a push that fits its model, else why not.

    ``key_model`` is the model the push was sent for (the Kafka key, the URL's model id);
    ``lookup`` gives a model's fit (None: unknown). The order is the contract: nothing is
    decoded from an oversized record; the codec's checks need no model; the push must be
    for ``key_model`` before any check that depends on a model, so every message names the
    model that both the sender and the push agree on.
    """
    if value is None:
        return Refusal(
            TOMBSTONE, "the record has no value (a tombstone); a push carries its encoded bytes"
        )
    if max_push_bytes is not None and len(value) > max_push_bytes:
        return Refusal(
            TOO_LARGE,
            f"push is {len(value)} bytes, the limit is {max_push_bytes}; "
            "send its samples in several smaller pushes",
        )
    try:
        push = codec.decode_push(value, num_classes=None, max_samples=max_push_samples)
    except codec.CodecError as exc:
        return Refusal(exc.reason.value, exc.message)
    model_id = push.model_id
    if key_model != model_id:
        sent_for = "with no key" if key_model is None else f"for model {key_model!r}"
        return Refusal(
            MODEL_MISMATCH,
            f"push of model {model_id!r} was sent {sent_for}; key each push by (post it "
            "to) its own model_id",
            model_id,
        )
    fit = lookup(model_id)
    if fit is None:
        return Refusal(
            UNKNOWN_MODEL,
            f"model {model_id!r} has no base update on the model topic yet; publish its "
            "v0 before devices push",
            model_id,
        )
    if push.backbone is not fit.backbone or push.cut is not fit.cut:
        return Refusal(
            MODEL_MISMATCH,
            f"push is {push.backbone}/{push.cut}, model {model_id!r} is "
            f"{fit.backbone}/{fit.cut}; extract features with the model's backbone and cut",
            model_id,
        )
    if fit.num_classes is not None:
        high = int(push.labels.max())
        if high >= fit.num_classes:
            return Refusal(
                LABEL_OUT_OF_RANGE,
                f"labels must be [0, {fit.num_classes}) for model {model_id!r}, got max "
                f"{high}; the model's classes are on its latest version",
                model_id,
            )
    return push


def accept_push(key: bytes | None, value: bytes | None, fit: ModelFit) -> FeaturePush | str:
    """The decoded push when the record is one of ``fit``'s model, ``OTHER_MODEL`` for
    another model's record, else the reason :func:`admit_push` refuses it (the agents
    dead-lettered it with that reason). A record without a key (e.g. from kcat) is
    recognised by its model id, and refused as the agents refuse it."""
    if key is not None and key != codec.encode_key(fit.model_id):
        return OTHER_MODEL
    admitted = admit_push(
        value,
        key_model=None if key is None else fit.model_id,
        lookup=lambda m: fit if m == fit.model_id else None,
        max_push_bytes=fit.max_push_bytes,
        max_push_samples=fit.max_push_samples,
    )
    if isinstance(admitted, FeaturePush):
        return admitted
    if key is None and admitted.model_id is not None and admitted.model_id != fit.model_id:
        return OTHER_MODEL
    return admitted.reason


def stable_unit_hash(device_id: str, sample_id: int, *, salt: str = "") -> float:
    """A key's position in [0, 1), identical in every process and Python version
    (``hash()`` is salted per process)."""
    digest = hashlib.blake2b(
        f"{salt}\x00{device_id}\x00{sample_id}".encode(), digest_size=8
    ).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def split_train_val(
    sample_keys: Sequence[tuple[str, int]], val_fraction: float, *, salt: str = ""
) -> npt.NDArray[np.bool_]:
    """Validation mask (True = validation) over ``(device_id, sample_id)`` keys.

    A sample's side depends on its key alone, so it never moves between train and
    validation as the dataset grows: champion and challenger are judged on held-out data
    neither has trained on.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    return np.fromiter(
        (stable_unit_hash(d, int(s), salt=salt) < val_fraction for d, s in sample_keys),
        dtype=np.bool_,
        count=len(sample_keys),
    )


def device_unit_hash(model_id: str, device_id: str) -> float:
    """A device's position in [0, 1) for one model: which devices a model holds out does
    not depend on its other devices, and differs between models."""
    digest = hashlib.blake2b(
        f"device\x00{model_id}\x00{device_id}".encode(), digest_size=8
    ).digest()
    return int.from_bytes(digest, "little") / 2.0**64


@dataclass(frozen=True, slots=True)
class ValidationRule:
    """Which of a model's samples are validation: every sample of a held-out device (a
    share ``val_device_fraction`` of devices, by :func:`device_unit_hash`), and a share
    ``val_fraction`` of the other devices' samples (by :func:`stable_unit_hash` of the key).
    A sample's side depends on its key and model alone, so it never moves as the log grows.
    """

    val_fraction: float
    val_device_fraction: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0.0 <= self.val_device_fraction < 1.0:
            raise ValueError(
                f"val_device_fraction must be in [0, 1), got {self.val_device_fraction}"
            )

    def held_out_devices(self, model_id: str, device_ids: Iterable[str]) -> set[str]:
        """The validation devices of ``model_id`` among ``device_ids``."""
        return {
            d for d in set(device_ids) if device_unit_hash(model_id, d) < self.val_device_fraction
        }

    def mask(self, model_id: str, sample_keys: Sequence[tuple[str, int]]) -> npt.NDArray[np.bool_]:
        """Validation mask (True = validation) over ``(device_id, sample_id)`` keys of
        ``model_id``."""
        held = self.held_out_devices(model_id, (d for d, _ in sample_keys))
        return np.fromiter(
            (d in held or stable_unit_hash(d, int(s)) < self.val_fraction for d, s in sample_keys),
            dtype=np.bool_,
            count=len(sample_keys),
        )
