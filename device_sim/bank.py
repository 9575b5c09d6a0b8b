"""The feature bank: the world's images run once through the real frozen backbone prefix.

Live features (the prefix on every image a device sees) cost ~10–30 ms an image on a CPU,
far too slow for thousands of simulated devices. The bank renders every image of the world
once (:meth:`device_sim.world.World.groups`), runs the prefix of
:func:`device_sim.backbone.build_world_backbone`
over it, and keeps the features (float16, like a push), true labels, model, camera domain,
image index and held-out flag in one safetensors file. A :class:`FeatureBank` then serves
device samples by vectorised row sampling.

The file is named by a content key (world fingerprint, backbone, cut, weights digest, format
version): a second :func:`build_bank` with the same configuration loads it instead of
recomputing, and a changed configuration builds a new file beside it. Builds are
deterministic: same world and batch size, byte-identical file.

It also owns the base model ``v0`` (:func:`train_base_head`): a head trained on the
pre-training identities in the clean domain, good there and mediocre on what devices see.
The small training loop here is deliberately not the trainer's recipe (apps never import
each other); it is plain AdamW + cross-entropy.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn

from device_sim.backbone import build_world_backbone, extract_features
from device_sim.world import ImageGroup, World
from pipeline.errors import FedexError
from pipeline.records import FEATURE_SHAPES, Backbone, Cut

#: The demo's backbone and cut: the paper's (InceptionResnetV1, embedding). Its random
#: features separate the world's identities far better than a random MobileNetV2's.
DEFAULT_BACKBONE = Backbone.INCEPTION_RESNET_V1
DEFAULT_CUT = Cut.FREEZE6

#: Bump when the file layout or the meaning of a column changes.
BANK_FORMAT = 1
_META_KEY = "fedex.bank"
_FP16_MAX = 65504.0
_COLUMNS = ("features", "labels", "models", "domains", "image_index", "holdout")


class BankError(FedexError):
    """A feature bank could not be built, read or sampled; the message says what to do."""


@dataclass(frozen=True, slots=True)
class BankSpec:
    """What a bank's content depends on; its sha256 names the file."""

    world: dict[str, object]
    backbone: str
    cut: str
    weights_sha256: str | None
    backbone_seed: int
    calibration_images: int
    format: int = BANK_FORMAT

    @property
    def key(self) -> str:
        canonical = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def as_dict(self) -> dict[str, object]:
        # Every field, and nothing else, is what the content depends on: the key hashes it.
        return asdict(self)


def bank_path(out: Path, spec: BankSpec) -> Path:
    return Path(out) / f"bank-{spec.backbone}-{spec.cut}-{spec.key[:16]}.safetensors"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_bank(
    world: World,
    *,
    backbone: Backbone | str = DEFAULT_BACKBONE,
    cut: Cut | str = DEFAULT_CUT,
    weights: Path | None = None,
    images_dir: Path | None = None,
    out: Path,
    batch_size: int = 32,
    progress: bool = False,
    backbone_seed: int = 0,
    calibration_images: int = 64,
) -> FeatureBank:
    """Build the feature bank of ``world`` in the directory ``out``, or load it when a bank
    of the same configuration is already there (``bank.from_cache`` says which).

    ``images_dir`` (``<identity>/*.jpg|png``) replaces the generated faces by real ones
    (:meth:`World.from_image_folder`, keeping the world's seed, vendors and fractions).
    ``weights`` is a local state-dict file for the backbone; without it the backbone is
    random with calibrated BatchNorm (:func:`build_world_backbone`). ``progress`` shows a
    rich progress bar. The prefix runs on exactly ``batch_size`` images at a time, so equal
    inputs give a byte-identical file.
    """
    backbone, cut = Backbone(backbone), Cut(cut)
    if batch_size < 1:
        raise BankError(f"batch_size must be ≥ 1, got {batch_size}")
    if cut is Cut.FULL:
        raise BankError("a bank at cut 'full' would hold raw images; pick freeze1..freeze6")
    if images_dir is not None:
        world = World.from_image_folder(images_dir, world.config)
    spec = BankSpec(
        world=world.fingerprint(),
        backbone=backbone.value,
        cut=cut.value,
        weights_sha256=file_sha256(weights) if weights is not None else None,
        backbone_seed=backbone_seed,
        calibration_images=calibration_images if weights is None else 0,
    )
    path = bank_path(out, spec)
    if path.is_file():
        try:
            bank = FeatureBank.load(path)
        except BankError:
            bank = None  # unreadable or tampered with: rebuild it
        if bank is not None and bank.key == spec.key:
            return bank

    started = time.perf_counter()
    parts = build_world_backbone(
        world,
        backbone,
        cut,
        weights=weights,
        seed=backbone_seed,
        calibration_images=spec.calibration_images,
    )
    groups = list(world.groups())
    columns = _run_prefix(world, parts.prefix, groups, batch_size, progress)
    shape = FEATURE_SHAPES[backbone][cut]
    if columns["features"].shape[1:] != shape:
        raise BankError(f"prefix produced {columns['features'].shape[1:]}, expected {shape}")
    meta = {
        "spec": spec.as_dict(),
        "key": spec.key,
        "models": list(world.model_ids),
        "identities": {m: list(world.identity_names(m)) for m in world.model_ids},
        "pretrain_identities": {m: world.pretrain_identities(m).tolist() for m in world.model_ids},
        "device_identities": {m: world.device_identities(m).tolist() for m in world.model_ids},
        "vendors": [c.name for c in world.cameras],
        "num_classes": world.config.identities,
        "feature_shape": list(shape),
        "content_sha256": content_sha256(columns),
    }
    _write_atomically(path, columns, meta)
    bank = FeatureBank.load(path)
    bank.from_cache = False
    bank.build_seconds = time.perf_counter() - started
    return bank


def _run_prefix(
    world: World,
    prefix: nn.Module,
    groups: Sequence[ImageGroup],
    batch_size: int,
    progress: bool,
) -> dict[str, np.ndarray]:
    holdout = world.config.holdout_fraction
    total = sum(len(g.indices) for g in groups)
    labels = np.concatenate([np.full(len(g.indices), g.identity) for g in groups]).astype(np.int32)
    models = np.concatenate([np.full(len(g.indices), g.model_index) for g in groups])
    domains = np.concatenate([np.full(len(g.indices), g.domain) for g in groups])
    image_index = np.concatenate([np.asarray(g.indices) for g in groups]).astype(np.int32)
    held = np.concatenate([g.holdout_mask(holdout) for g in groups])
    features: list[np.ndarray] = []

    def images() -> Iterator[Tensor]:
        for g in groups:
            yield world.images(world.model_ids[g.model_index], g.identity, g.domain, g.indices)

    bar = _Bar(total, "feature bank") if progress else None
    try:
        for batch in _rebatch(images(), batch_size):
            out = extract_features(prefix, batch)
            peak = float(out.abs().max()) if out.numel() else 0.0
            if not math.isfinite(peak) or peak >= _FP16_MAX:
                raise BankError(
                    f"prefix output reaches {peak:g}, beyond float16; "
                    "is the weights file for this backbone?"
                )
            features.append(out.to(torch.float16).numpy())
            if bar is not None:
                bar.advance(batch.shape[0])
    finally:
        if bar is not None:
            bar.close()
    return {
        "features": np.ascontiguousarray(np.concatenate(features)),
        "labels": labels,
        "models": models.astype(np.int32),
        "domains": domains.astype(np.uint8),
        "image_index": image_index,
        "holdout": held.astype(np.uint8),
    }


def _rebatch(chunks: Iterator[Tensor], size: int) -> Iterator[Tensor]:
    """Regroup a stream of image chunks into batches of exactly ``size`` (the last less)."""
    pending: list[Tensor] = []
    count = 0
    for chunk in chunks:
        pending.append(chunk)
        count += chunk.shape[0]
        while count >= size:
            merged = torch.cat(pending)
            yield merged[:size]
            rest = merged[size:]
            pending, count = ([rest], rest.shape[0]) if rest.shape[0] else ([], 0)
    if count:
        yield torch.cat(pending)


class _Bar:
    def __init__(self, total: int, label: str) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        self._progress.start()
        self._task = self._progress.add_task(label, total=total)

    def advance(self, n: int) -> None:
        self._progress.advance(self._task, n)

    def close(self) -> None:
        self._progress.stop()


def content_sha256(columns: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in _COLUMNS:
        array = np.ascontiguousarray(columns[name])
        h.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
        h.update(array.tobytes())
    return h.hexdigest()


def _write_atomically(
    path: Path, columns: Mapping[str, np.ndarray], meta: dict[str, object]
) -> None:
    from safetensors.numpy import save

    path.parent.mkdir(parents=True, exist_ok=True)
    # One metadata key holding sorted JSON: the header is byte-stable across runs.
    blob = save(dict(columns), metadata={_META_KEY: json.dumps(meta, sort_keys=True)})
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a bank is shared data
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- sampling


@dataclass(eq=False)
class FeatureBank:
    """A loaded bank: columns as numpy arrays plus an index for fast sampling.

    Rows are grouped by (model, domain, held-out, identity); :meth:`draw` and
    :meth:`draw_batch` pick rows of a device's vendor and identities with a few vectorised
    numpy calls, whatever the number of devices. Features stay float16 (push dtype).
    """

    path: Path
    meta: dict[str, object]
    features: npt.NDArray[np.float16]
    labels: npt.NDArray[np.int32]
    models: npt.NDArray[np.int32]
    domains: npt.NDArray[np.uint8]
    image_index: npt.NDArray[np.int32]
    holdout: npt.NDArray[np.bool_]
    from_cache: bool = True
    build_seconds: float = 0.0
    _order: npt.NDArray[np.int64] = field(init=False, repr=False)
    _starts: npt.NDArray[np.int64] = field(init=False, repr=False)
    _counts: npt.NDArray[np.int64] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        gid = self._group_ids(self.models, self.domains, self.holdout, self.labels)
        self._order = np.argsort(gid, kind="stable")
        groups = len(self.model_ids) * (self.num_domains) * 2 * self.num_classes
        self._counts = np.bincount(gid, minlength=groups).astype(np.int64)
        self._starts = np.concatenate([[0], np.cumsum(self._counts)[:-1]]).astype(np.int64)

    def _group_ids(
        self,
        models: npt.ArrayLike,
        domains: npt.ArrayLike,
        holdout: npt.ArrayLike,
        identities: npt.ArrayLike,
    ) -> npt.NDArray[np.int64]:
        m = np.asarray(models, dtype=np.int64)
        d = np.asarray(domains, dtype=np.int64)
        h = np.asarray(holdout, dtype=np.int64)
        i = np.asarray(identities, dtype=np.int64)
        return ((m * self.num_domains + d) * 2 + h) * self.num_classes + i

    def with_features(
        self, features: npt.NDArray[np.float16], meta: dict[str, object], path: Path
    ) -> FeatureBank:
        """A bank of the same rows (labels, models, domains, images, hold-out) with other
        ``features`` and ``meta``, held in memory only (a twin, an expansion)."""
        return replace(
            self, path=path, meta=meta, features=features, from_cache=False, build_seconds=0.0
        )

    # ---------------------------------------------------------------- loading

    @classmethod
    def load(cls, path: Path, *, verify: bool = True) -> FeatureBank:
        """Read a bank file; with ``verify`` its content hash is checked."""
        from safetensors import safe_open
        from safetensors.numpy import load_file

        path = Path(path)
        try:
            with safe_open(str(path), framework="np") as f:
                raw_meta = (f.metadata() or {}).get(_META_KEY)
            columns = load_file(str(path))
        except Exception as exc:
            raise BankError(
                f"cannot read feature bank {path}: {exc}; delete it to rebuild"
            ) from exc
        if raw_meta is None or set(columns) != set(_COLUMNS):
            raise BankError(f"{path} is not a feature bank (format {BANK_FORMAT})")
        meta = json.loads(raw_meta)
        spec = meta.get("spec", {})
        if not isinstance(spec, dict) or spec.get("format") != BANK_FORMAT:
            raise BankError(f"{path} has bank format {spec}, this code reads {BANK_FORMAT}")
        if verify and content_sha256(columns) != meta.get("content_sha256"):
            raise BankError(f"feature bank {path} does not match its content hash; rebuild it")
        return cls(
            path=path,
            meta=meta,
            features=columns["features"],
            labels=columns["labels"],
            models=columns["models"],
            domains=columns["domains"],
            image_index=columns["image_index"],
            holdout=columns["holdout"].astype(np.bool_),
        )

    # ---------------------------------------------------------------- description

    @property
    def key(self) -> str:
        return str(self.meta["key"])

    @property
    def content_sha256(self) -> str:
        return str(self.meta["content_sha256"])

    @property
    def spec(self) -> dict[str, object]:
        spec = self.meta["spec"]
        assert isinstance(spec, dict)
        return spec

    @property
    def backbone(self) -> Backbone:
        return Backbone(str(self.spec["backbone"]))

    @property
    def cut(self) -> Cut:
        return Cut(str(self.spec["cut"]))

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.features.shape[1:])

    @property
    def model_ids(self) -> list[str]:
        models = self.meta["models"]
        assert isinstance(models, list)
        return [str(m) for m in models]

    @property
    def num_classes(self) -> int:
        return int(str(self.meta["num_classes"]))

    @property
    def num_domains(self) -> int:
        vendors = self.meta["vendors"]
        assert isinstance(vendors, list)
        return len(vendors)

    @property
    def vendor_domains(self) -> tuple[int, ...]:
        return tuple(range(1, self.num_domains))

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def model_index(self, model_id: str) -> int:
        try:
            return self.model_ids.index(model_id)
        except ValueError:
            raise BankError(f"model {model_id!r} is not in bank {self.path.name}") from None

    def _identity_list(self, table: str, model_id: str) -> npt.NDArray[np.int64]:
        mapping = self.meta[table]
        assert isinstance(mapping, dict)
        self.model_index(model_id)
        return np.asarray(mapping[model_id], dtype=np.int64)

    def pretrain_identities(self, model_id: str) -> npt.NDArray[np.int64]:
        return self._identity_list("pretrain_identities", model_id)

    def device_identities(self, model_id: str) -> npt.NDArray[np.int64]:
        return self._identity_list("device_identities", model_id)

    # ---------------------------------------------------------------- selection

    def select(
        self,
        model_id: str,
        *,
        domains: Sequence[int] | None = None,
        identities: npt.ArrayLike | None = None,
        holdout: bool | None = None,
    ) -> npt.NDArray[np.int64]:
        """Row indices of ``model_id`` (optionally only these domains, identities and
        held-out side), in bank order."""
        mask = self.models == self.model_index(model_id)
        if domains is not None:
            mask &= np.isin(self.domains, np.asarray(domains))
        if identities is not None:
            mask &= np.isin(self.labels, np.asarray(identities))
        if holdout is not None:
            mask &= self.holdout == holdout
        return np.flatnonzero(mask).astype(np.int64)

    def take(self, rows: npt.ArrayLike) -> tuple[npt.NDArray[np.float16], npt.NDArray[np.int32]]:
        """Features (float16) and true labels of ``rows``."""
        index = np.asarray(rows, dtype=np.int64)
        return self.features[index], self.labels[index]

    def draw(
        self,
        model_id: str,
        vendor: int,
        identities: npt.ArrayLike,
        n: int,
        rng: np.random.Generator,
        *,
        holdout: bool = False,
    ) -> npt.NDArray[np.int64]:
        """``n`` rows for one device: identities uniform over ``identities``, images uniform
        within each, from camera ``vendor``'s train side (or held-out side)."""
        ids = np.asarray(identities, dtype=np.int64)
        return self.draw_batch(model_id, np.asarray([vendor]), [ids], n, rng, holdout=holdout)[0]

    def draw_batch(
        self,
        model_id: str,
        vendors: npt.ArrayLike,
        identities: Sequence[npt.ArrayLike],
        n: int,
        rng: np.random.Generator,
        *,
        holdout: bool = False,
    ) -> npt.NDArray[np.int64]:
        """Rows [devices, n] for many devices at once: device ``k`` draws from camera
        ``vendors[k]`` and identities ``identities[k]``. Vectorised over devices."""
        vend = np.asarray(vendors, dtype=np.int64)
        sets = [np.asarray(s, dtype=np.int64).ravel() for s in identities]
        if len(sets) != vend.shape[0]:
            raise BankError(f"{vend.shape[0]} vendors but {len(sets)} identity sets")
        if not sets:
            return np.zeros((0, n), dtype=np.int64)
        sizes = np.asarray([s.size for s in sets], dtype=np.int64)
        if (sizes == 0).any():
            raise BankError("every device needs at least one identity to draw from")
        if ((vend < 0) | (vend >= self.num_domains)).any():
            raise BankError(f"vendor out of range [0, {self.num_domains})")
        flat = np.concatenate(sets)
        if ((flat < 0) | (flat >= self.num_classes)).any():
            raise BankError(f"identity out of range [0, {self.num_classes})")
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        devices = vend.shape[0]
        pick = (rng.random((devices, n)) * sizes[:, None]).astype(np.int64)
        ident = flat[offsets[:, None] + pick]
        gid = self._group_ids(self.model_index(model_id), vend[:, None], int(holdout), ident)
        counts = self._counts[gid]
        if (counts == 0).any():
            bad = np.argwhere(counts == 0)[0]
            raise BankError(
                f"bank has no {'held-out' if holdout else 'train'} features of {model_id} "
                f"identity {ident[tuple(bad)]} in domain {vend[bad[0]]}; is it a device "
                "identity and the domain a vendor (≥ 1)?"
            )
        within = (rng.random((devices, n)) * counts).astype(np.int64)
        return self._order[self._starts[gid] + within]

    def held_out(
        self, model_id: str, vendor: int, identities: npt.ArrayLike
    ) -> npt.NDArray[np.int64]:
        """Every held-out row of ``identities`` through camera ``vendor``: a device's
        evaluation set (never drawn for pushes)."""
        return self.select(model_id, domains=[vendor], identities=identities, holdout=True)


# --------------------------------------------------------------------------- the command
