"""The synthetic world the simulator lives in, deterministic from one seed.

Per model (a ``model_id`` on the topics; every model has its own people):

- **identities** ``0..N-1`` are the model's classes. A seeded permutation splits them into
  the *pre-training* identities (the first ``pretrain_fraction`` of it) and the *device*
  identities (the last ``device_fraction``). With the defaults (0.75, 1.0) devices see every
  identity: three quarters of them the base model was pre-trained on (in the clean domain
  only), one quarter it has never seen. That is the product's story: the base model is good
  on its pre-training data and mediocre on the devices' data, and personalising the head on
  device features raises device accuracy visibly.
- **images** of an identity come from :func:`device_sim.images.render_faces` (a prototype
  per identity plus per-image scene, pose, light, expression, occlusion and age, scaled by
  ``variation``), or from a folder of real faces (:meth:`World.from_image_folder`).
- **domains**: 0 is the clean studio camera of the pre-training data; 1..V are the vendor /
  sensor-tier camera pipelines (:func:`device_sim.cameras.camera_profiles`), the
  system-induced heterogeneity every device inherits from its vendor.
- **devices**: :meth:`World.device_profile` gives a device its vendor and the handful of
  identities its user photographs, from ``(seed, model, device_id)`` alone, so any process
  of a fleet derives the same profile.

Labels here are always true: label noise is the device's business.

What the default world is: 2 models × 48 identities, 24 clean images per pre-training
identity and 24 images per device identity *and* vendor (4 vendors), so the devices'
held-out set has 6 images per identity and vendor, 24 per identity; 10,944 images in all.
Its pretrained-backbone bank (InceptionResnetV1 CASIA-WebFace, freeze6) built in 800 s on
two shared CPU cores (~14 images/s). Measured on it (``variation`` 1, ``camera_strength``
1.5; models faces-1 / faces-2): the base head ``v0`` scores 0.84 / 0.81 on clean held-out
images of its pre-training identities, 0.67 / 0.64 on the devices' images of those
identities and 0.50 / 0.48 on all the devices' images (0 on the quarter it never saw); a
head warm-started from ``v0`` and fitted on the devices' train images rises with their
number: 0.41 / 0.43 at 2% of them, 0.69 / 0.64 at 10%, 0.80 / 0.74 at 25%, 0.88 / 0.85 at
all. Raw pixels do not separate its identities: nearest-centroid on 16×16 thumbnails of
the devices' images scores 0.19 (chance 0.02; 1.0 at ``variation`` 0).

What it is not: a face data set. Identities are cartoons drawn from a few dozen shape and
colour parameters; the nuisances (pose, light, occluders, age, cameras) are independent of
identity and of each other; every identity is equally frequent, and no two identities are
near-duplicates by construction (only by chance). Numbers measured on it show whether a
method learns from data and copes with camera shift, not how it fares on real faces.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from device_sim.cameras import CameraProfile, apply_camera, camera_profiles
from device_sim.images import CLEAN_DOMAIN, render_faces, rng_for, stable_key
from pipeline.errors import ConfigError
from pipeline.records import IMAGE_SIZE

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

#: Salts of the independent random streams drawn from the seed.
_SPLIT, _DEVICE, _NOISE = stable_key("split"), stable_key("device"), stable_key("noise")

#: Beyond twice the default variation faces are mostly scenery; refused as a config error.
MAX_VARIATION = 2.0


@dataclass(frozen=True, slots=True)
class WorldConfig:
    """Everything the world is generated from. Two worlds with equal configs are equal.

    ``pretrain_images`` clean images are rendered per pre-training identity;
    ``device_images`` per device identity *and vendor* (each vendor sees other images).
    ``holdout_fraction`` of each (identity, domain) group is held out: pre-training
    validation in the clean domain, device evaluation in the vendor domains.
    ``variation`` scales every within-class change of the renderer (scene, pose, light,
    expression, occlusion, age; 0 = the easy world of aligned portraits, at most
    ``MAX_VARIATION``); ``camera_strength`` scales every vendor camera's distortion.
    """

    seed: int = 0
    models: tuple[str, ...] = ("faces-1", "faces-2")
    identities: int = 48
    pretrain_fraction: float = 0.75
    device_fraction: float = 1.0
    pretrain_images: int = 24
    device_images: int = 24
    vendors: int = 4
    camera_strength: float = 1.5
    variation: float = 1.0
    holdout_fraction: float = 0.25
    identities_per_device: tuple[int, int] = (3, 8)

    def __post_init__(self) -> None:
        if not self.models or len(set(self.models)) != len(self.models):
            raise ConfigError(f"models must be distinct and not empty, got {self.models}")
        if self.identities < 2:
            raise ConfigError(f"a model needs ≥ 2 identities, got {self.identities}")
        for name in ("pretrain_fraction", "device_fraction"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ConfigError(f"{name} must be in (0, 1], got {value}")
        if self.pretrain_fraction + self.device_fraction < 1.0:
            raise ConfigError("pretrain_fraction + device_fraction must be ≥ 1 (they cover all)")
        if self.pretrain_images < 1 or self.device_images < 1 or self.vendors < 1:
            raise ConfigError("pretrain_images, device_images and vendors must be ≥ 1")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ConfigError(f"holdout_fraction must be in [0, 1), got {self.holdout_fraction}")
        lo, hi = self.identities_per_device
        if not 1 <= lo <= hi:
            raise ConfigError(f"identities_per_device must be 1 ≤ lo ≤ hi, got {(lo, hi)}")
        if self.camera_strength < 0:
            raise ConfigError("camera_strength must be ≥ 0")
        if not 0.0 <= self.variation <= MAX_VARIATION:
            raise ConfigError(f"variation must be in [0, {MAX_VARIATION}], got {self.variation}")


@dataclass(frozen=True, slots=True)
class DeviceProfile:
    """What one simulated device is: its camera (a vendor domain ≥ 1) and the identities
    (class labels of its model) its user photographs."""

    model_id: str
    device_id: str
    vendor: int
    identities: npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class ImageGroup:
    """One (model, identity, domain) cell of the world: the image indices rendered there."""

    model_index: int
    identity: int
    domain: int
    indices: tuple[int, ...]

    def holdout_mask(self, fraction: float) -> npt.NDArray[np.bool_]:
        """The last ``ceil(fraction·n)`` images are held out, but never every one."""
        n = len(self.indices)
        held = min(math.ceil(fraction * n), n - 1) if n > 1 else 0
        mask = np.zeros(n, dtype=np.bool_)
        if held:
            mask[n - held :] = True
        return mask


@dataclass(frozen=True)
class ImageFolder:
    """Real faces: ``root/<identity>/*.jpg|png``, identities and files in sorted order."""

    root: Path
    identities: tuple[str, ...]
    files: tuple[tuple[Path, ...], ...]

    @classmethod
    def scan(cls, root: Path) -> ImageFolder:
        root = Path(root)
        if not root.is_dir():
            raise ConfigError(f"image folder {root} does not exist; expected <root>/<identity>/*")
        names: list[str] = []
        files: list[tuple[Path, ...]] = []
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            images = tuple(sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
            if images:
                names.append(sub.name)
                files.append(images)
        if len(names) < 2:
            raise ConfigError(
                f"image folder {root} has {len(names)} identity folders with images; "
                "need ≥ 2 subfolders <identity>/ holding .jpg or .png files"
            )
        return cls(root, tuple(names), tuple(files))

    def digest(self) -> str:
        """sha256 over every file's relative path and bytes: the cache key of its bank."""
        h = hashlib.sha256()
        for images in self.files:
            for path in images:
                h.update(str(path.relative_to(self.root)).encode() + b"\x00")
                h.update(hashlib.sha256(path.read_bytes()).digest())
        return h.hexdigest()

    def load(self, identity: int, indices: Sequence[int]) -> Tensor:
        from PIL import Image

        out = torch.empty(len(indices), 3, IMAGE_SIZE, IMAGE_SIZE)
        for row, index in enumerate(indices):
            path = self.files[identity][index]
            try:
                with Image.open(path) as image:
                    rgb = image.convert("RGB")
            except OSError as exc:
                raise ConfigError(f"cannot read image {path}: {exc}") from exc
            w, h = rgb.size
            side = min(w, h)  # centre square, then resize: faces keep their aspect
            left, top = (w - side) // 2, (h - side) // 2
            rgb = rgb.crop((left, top, left + side, top + side)).resize(
                (IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR
            )
            array = np.asarray(rgb, dtype=np.float32) / 255.0
            out[row] = torch.from_numpy(array).permute(2, 0, 1)
        return out


@dataclass(frozen=True)
class World:
    """The generated world of :class:`WorldConfig` (or of a real image folder)."""

    config: WorldConfig = field(default_factory=WorldConfig)
    folder: ImageFolder | None = None

    @classmethod
    def from_image_folder(cls, root: Path, config: WorldConfig | None = None) -> World:
        """A world of real faces: one model (the config's first), whose identities are the
        folder's subfolders. Each identity's files are split in order: the first half are
        its clean pre-training images, the rest its device images, seen through every
        vendor's camera (an identity on one side only uses all its files there)."""
        config = config or WorldConfig()
        folder = ImageFolder.scan(root)
        config = replace(config, models=config.models[:1], identities=len(folder.identities))
        return cls(config, folder)

    # ---------------------------------------------------------------- identities

    @property
    def model_ids(self) -> tuple[str, ...]:
        return self.config.models

    def model_index(self, model_id: str) -> int:
        try:
            return self.config.models.index(model_id)
        except ValueError:
            raise ConfigError(
                f"unknown model {model_id!r}; the world has {self.model_ids}"
            ) from None

    def num_classes(self, model_id: str) -> int:
        self.model_index(model_id)
        return self.config.identities

    def identity_names(self, model_id: str) -> tuple[str, ...]:
        self.model_index(model_id)
        if self.folder is not None:
            return self.folder.identities
        return tuple(f"{model_id}/id{k:04d}" for k in range(self.config.identities))

    def _permutation(self, model_id: str) -> npt.NDArray[np.int64]:
        rng = rng_for(self.config.seed, stable_key(model_id), _SPLIT)
        return rng.permutation(self.config.identities).astype(np.int64)

    def _counts(self) -> tuple[int, int]:
        n = self.config.identities
        pretrain = min(n, max(1, round(n * self.config.pretrain_fraction)))
        device = min(n, max(1, round(n * self.config.device_fraction)))
        return pretrain, device

    def pretrain_identities(self, model_id: str) -> npt.NDArray[np.int64]:
        """Identities the base model is trained on (clean domain), sorted."""
        pretrain, _ = self._counts()
        return np.sort(self._permutation(model_id)[:pretrain])

    def device_identities(self, model_id: str) -> npt.NDArray[np.int64]:
        """Identities devices photograph (vendor domains), sorted."""
        _, device = self._counts()
        perm = self._permutation(model_id)
        return np.sort(perm[len(perm) - device :])

    def novel_identities(self, model_id: str) -> npt.NDArray[np.int64]:
        """Device identities the base model never saw."""
        return np.setdiff1d(self.device_identities(model_id), self.pretrain_identities(model_id))

    # ---------------------------------------------------------------- cameras

    @functools.cached_property
    def cameras(self) -> list[CameraProfile]:
        """Index = domain: 0 the clean camera, 1..vendors the vendor pipelines."""
        return camera_profiles(
            self.config.seed, self.config.vendors, strength=self.config.camera_strength
        )

    @property
    def vendor_domains(self) -> tuple[int, ...]:
        return tuple(range(1, self.config.vendors + 1))

    # ---------------------------------------------------------------- images

    def groups(self) -> Iterator[ImageGroup]:
        """Every (model, identity, domain) cell a feature bank holds, in bank order."""
        cfg = self.config
        for m, model_id in enumerate(cfg.models):
            pretrain = set(self.pretrain_identities(model_id).tolist())
            device = set(self.device_identities(model_id).tolist())
            for identity in range(cfg.identities):
                clean, shifted = self._indices(identity, identity in pretrain, identity in device)
                if identity in pretrain:
                    yield ImageGroup(m, identity, CLEAN_DOMAIN, clean)
                if identity in device:
                    for v in self.vendor_domains:
                        yield ImageGroup(m, identity, v, shifted[v - 1])

    def _indices(
        self, identity: int, pretrain: bool, device: bool
    ) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
        cfg = self.config
        if self.folder is None:
            p, d = cfg.pretrain_images, cfg.device_images
            clean = tuple(range(p))
            shifted = [tuple(range(p + v * d, p + (v + 1) * d)) for v in range(cfg.vendors)]
            return clean, shifted
        n = len(self.folder.files[identity])
        cut = math.ceil(n / 2) if pretrain and device and n > 1 else (n if pretrain else 0)
        clean = tuple(range(cut))
        rest = tuple(range(cut, n)) if cut < n else tuple(range(n))
        return clean, [rest] * cfg.vendors

    def images(self, model_id: str, identity: int, domain: int, indices: Sequence[int]) -> Tensor:
        """Images ``indices`` of ``identity`` through camera ``domain``: float32
        [n, 3, 160, 160] in [0, 1]. Each is a function of (seed, model, identity, index,
        domain) alone."""
        cfg = self.config
        if not 0 <= identity < cfg.identities:
            raise ConfigError(f"identity {identity} out of range [0, {cfg.identities})")
        if not 0 <= domain <= cfg.vendors:
            raise ConfigError(f"domain {domain} out of range [0, {cfg.vendors}]")
        model_key = stable_key(model_id)
        self.model_index(model_id)
        if self.folder is not None:
            base = self.folder.load(identity, indices)
        else:
            base = render_faces(cfg.seed, model_key, identity, indices, variation=cfg.variation)
        seeds = [
            int(rng_for(cfg.seed, model_key, _NOISE, identity, int(i), domain).integers(2**31))
            for i in indices
        ]
        return apply_camera(base, self.cameras[domain], seeds)

    # ---------------------------------------------------------------- devices

    def device_profile(self, model_id: str, device_id: str) -> DeviceProfile:
        """The device's vendor (uniform over vendors) and its user's identities (a uniform
        subset of the device identities, ``identities_per_device`` in size)."""
        rng = rng_for(self.config.seed, stable_key(model_id), _DEVICE, stable_key(device_id))
        candidates = self.device_identities(model_id)
        lo, hi = self.config.identities_per_device
        k = min(int(rng.integers(lo, hi + 1)), len(candidates))
        vendor = int(rng.integers(1, self.config.vendors + 1))
        chosen = np.sort(rng.choice(candidates, size=k, replace=False))
        return DeviceProfile(model_id, device_id, vendor, chosen.astype(np.int64))

    # ---------------------------------------------------------------- identity of the world

    def fingerprint(self) -> dict[str, object]:
        """What the world's images depend on (a bank's cache key includes it)."""
        data: dict[str, object] = {"config": asdict(self.config), "generator": GENERATOR_VERSION}
        if self.folder is not None:
            data["folder"] = self.folder.digest()
        return data


#: Bump when the renderer or camera pipelines change what an image looks like (it
#: invalidates every cached feature bank).
GENERATOR_VERSION = 2
