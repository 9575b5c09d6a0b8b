"""Which samples a model's feature log holds, and on which side of the split each one is.

Pure, no Kafka and no torch: the rules that the trainer (assembling a job's dataset) and
``fedex audit`` (rebuilding every job from the log) must apply identically.

* :func:`accept_push` says whether a feature-log record is a push of a model that fits it
  (decodes; model id, backbone, cut and label range match), or why not.
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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from pipeline import codec
from pipeline.records import Backbone, Cut, FeaturePush

#: Reasons :func:`accept_push` gives besides the codec's own.
OTHER_MODEL = "other_model"
TOMBSTONE = "tombstone"
WRONG_BACKBONE_OR_CUT = "wrong_backbone_or_cut"


@dataclass(frozen=True, slots=True)
class ModelFit:
    """What a push must match to be one of the model's samples."""

    model_id: str
    backbone: Backbone
    cut: Cut
    num_classes: int | None
    max_push_samples: int = codec.DEFAULT_MAX_SAMPLES


def accept_push(key: bytes | None, value: bytes | None, fit: ModelFit) -> FeaturePush | str:
    """The decoded push when the record is one of ``fit``'s model, else the reason it is
    not (``OTHER_MODEL`` for another model's record, anything else a rejection). A record
    without a key (e.g. from kcat) is decoded and recognised by its model id."""
    if key is not None and key != codec.encode_key(fit.model_id):
        return OTHER_MODEL
    if value is None:
        return TOMBSTONE
    try:
        push = codec.decode_push(
            value, num_classes=fit.num_classes, max_samples=fit.max_push_samples
        )
    except codec.CodecError as exc:
        return exc.reason.value
    if push.model_id != fit.model_id:
        return OTHER_MODEL
    if push.backbone is not fit.backbone or push.cut is not fit.cut:
        return WRONG_BACKBONE_OR_CUT
    return push


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
