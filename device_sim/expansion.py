"""Paper-scale worlds in feature space, sampled from a fitted :class:`FeatureModel`.

The paper's Figure 4 retrains the classifier of 8,631 identities on up to 437,855
additional features. Rendering and running that many faces through the backbone would take
about a day on this CPU, so :func:`expand` samples such a world from a model fitted on real
backbone features (:func:`device_sim.feature_model.fit` on a rendered bank) and returns it
as an in-memory :class:`~device_sim.bank.FeatureBank`, which every bench already reads:

- identities ``0..N-1`` split into pre-training and device identities by
  :class:`~device_sim.world.World`'s seeded permutation (three quarters pre-trained, every
  identity photographed by devices), each with a fresh offset ``a_k``, per-camera
  interaction ``c_kv`` and the within-cell variation of a fitted identity it borrows;
- ``device_rows`` device train features spread over the (identity, vendor) cells as evenly
  as integers allow (the paper's 437,855 exactly), plus ``device_holdout`` held-out
  features per cell (dozens per identity over the vendors);
- ``pretrain_rows`` clean train and ``pretrain_holdout`` clean held-out features per
  pre-training identity, for the base model ``v0``.

Every row is its own draw (no two rows are copies), and the train and held-out sides come
from separate random streams, so growing the train side never changes the held-out one.
:func:`twin` resamples a real bank's train rows instead (same identities, cells and
counts, real held-out rows kept): the fidelity check of ``fedex bench expansion``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt

from device_sim.bank import BANK_FORMAT, FeatureBank, content_sha256
from device_sim.feature_model import FeatureModel
from device_sim.images import CLEAN_DOMAIN, rng_for, stable_key
from device_sim.world import World, WorldConfig
from pipeline.errors import ConfigError
from pipeline.records import Backbone, Cut

#: Random streams of an expansion (each side of the world its own).
_CENTRES, _TRAIN, _HOLDOUT, _PLACES = (
    stable_key("expansion/centres"),
    stable_key("expansion/train"),
    stable_key("expansion/holdout"),
    stable_key("expansion/places"),
)
#: Rows sampled per numpy call (bounds the float32 scratch memory to ~130 MB at 512-d).
_CHUNK = 65_536


@dataclass(frozen=True, slots=True)
class ExpansionConfig:
    """What an expanded world holds; :data:`PAPER` is Figure 4's."""

    seed: int = 0
    model_id: str = "faces-1"
    identities: int = 8631
    device_rows: int = 437_855
    device_holdout: int = 6
    pretrain_fraction: float = 0.75
    pretrain_rows: int = 16
    pretrain_holdout: int = 4

    def __post_init__(self) -> None:
        if self.identities < 2:
            raise ConfigError(f"an expanded world needs ≥ 2 identities, got {self.identities}")
        if self.device_rows < 0 or self.device_holdout < 1:
            raise ConfigError("device_rows must be ≥ 0 and device_holdout ≥ 1")
        if self.pretrain_rows < 1 or self.pretrain_holdout < 1:
            raise ConfigError("pretrain_rows and pretrain_holdout must be ≥ 1")
        if not 0.0 < self.pretrain_fraction <= 1.0:
            raise ConfigError(f"pretrain_fraction must be in (0, 1], got {self.pretrain_fraction}")

    def scaled(self, scale: float) -> ExpansionConfig:
        """The same world with ``scale`` times the identities and device features (per
        identity counts unchanged): ``--scale 0.1`` is a tenth of the paper."""
        if not 0.0 < scale <= 1.0:
            raise ConfigError(f"scale must be in (0, 1], got {scale}")
        return replace(
            self,
            identities=max(2, round(self.identities * scale)),
            device_rows=round(self.device_rows * scale),
        )


PAPER = ExpansionConfig()


def split_world(config: ExpansionConfig, vendors: int) -> World:
    """The world whose identity split the expansion uses (no image is ever rendered)."""
    return World(
        WorldConfig(
            seed=config.seed,
            models=(config.model_id,),
            identities=config.identities,
            pretrain_fraction=config.pretrain_fraction,
            device_fraction=1.0,
            vendors=vendors,
        )
    )


def spread_rows(total: int, cells: int, rng: np.random.Generator) -> npt.NDArray[np.int64]:
    """``total`` rows over ``cells`` as evenly as integers allow: every cell gets the floor,
    a random ``total mod cells`` of them one more. Sums to ``total`` exactly."""
    if cells < 1:
        raise ConfigError("no cells to spread rows over")
    counts = np.full(cells, total // cells, dtype=np.int64)
    counts[rng.permutation(cells)[: total % cells]] += 1
    return counts


# --------------------------------------------------------------------------- building


@dataclass(frozen=True, slots=True)
class _Plan:
    """Rows to draw: the identity and camera domain of each."""

    labels: npt.NDArray[np.int64]
    domains: npt.NDArray[np.int64]

    @classmethod
    def of(
        cls,
        identities: npt.NDArray[np.int64],
        domains: npt.NDArray[np.int64],
        counts: npt.ArrayLike,
    ) -> _Plan:
        reps = np.asarray(counts, dtype=np.int64)
        return cls(np.repeat(identities, reps), np.repeat(domains, reps))


def _sample(
    model: FeatureModel,
    centres: npt.NDArray[np.float32],
    within: npt.NDArray[np.int64],
    plan: _Plan,
    rng: np.random.Generator,
) -> npt.NDArray[np.float16]:
    """One fresh draw per planned row (identity ``k`` varies like fitted identity
    ``within[k]``), float16 like a push, in chunks."""
    n = int(plan.labels.size)
    out = np.empty((n, model.dim), dtype=np.float16)
    for start in range(0, n, _CHUNK):
        stop = min(n, start + _CHUNK)
        ident, dom = plan.labels[start:stop], plan.domains[start:stop]
        drawn = model.sample(centres[ident, dom], dom, rng, within[ident])
        out[start:stop] = np.clip(drawn, -65504.0, 65504.0)
    return out


def expand(
    model: FeatureModel,
    config: ExpansionConfig = PAPER,
    *,
    backbone: Backbone | str = Backbone.INCEPTION_RESNET_V1,
    cut: Cut | str = Cut.FREEZE6,
    source: str = "",
) -> FeatureBank:
    """The expanded world of ``config`` as an in-memory bank (see the module docstring).
    ``source`` names what ``model`` was fitted on (a bank key), recorded in its spec."""
    vendors = model.num_domains - 1
    if vendors < 1:
        raise ConfigError("the feature model has no camera domain to expand devices into")
    world = split_world(config, vendors)
    pretrain = world.pretrain_identities(config.model_id)
    device = world.device_identities(config.model_id)
    rng = rng_for(config.seed, _CENTRES)
    centres = model.cell_centres(model.new_identities(config.identities, rng), rng)
    within = model.borrow_within(config.identities, rng)

    vendor_domains = np.arange(1, vendors + 1, dtype=np.int64)
    dev_ids = np.repeat(device, vendors)
    dev_doms = np.tile(vendor_domains, device.size)
    clean = np.full(pretrain.size, CLEAN_DOMAIN, dtype=np.int64)
    per_cell = spread_rows(config.device_rows, dev_ids.size, rng_for(config.seed, _PLACES))
    train = [
        _Plan.of(pretrain, clean, np.full(pretrain.size, config.pretrain_rows)),
        _Plan.of(dev_ids, dev_doms, per_cell),
    ]
    held = [
        _Plan.of(pretrain, clean, np.full(pretrain.size, config.pretrain_holdout)),
        _Plan.of(dev_ids, dev_doms, np.full(dev_ids.size, config.device_holdout)),
    ]
    sides = [(train, rng_for(config.seed, _TRAIN)), (held, rng_for(config.seed, _HOLDOUT))]
    features, labels, domains, holdout = [], [], [], []
    for is_holdout, (plans, side_rng) in enumerate(sides):
        for plan in plans:
            features.append(_sample(model, centres, within, plan, side_rng))
            labels.append(plan.labels)
            domains.append(plan.domains)
            holdout.append(np.full(plan.labels.size, bool(is_holdout)))
    spec = {
        "expansion": asdict(config),
        "fitted_on": source,
        "model": model.summary(),
        "backbone": Backbone(backbone).value,
        "cut": Cut(cut).value,
        "format": BANK_FORMAT,
    }
    return in_memory_bank(
        spec,
        world,
        np.concatenate(features),
        np.concatenate(labels),
        np.concatenate(domains),
        np.concatenate(holdout),
        vendors=["clean", *(f"vendor-{v}" for v in vendor_domains.tolist())],
    )


def twin(bank: FeatureBank, model: FeatureModel, model_id: str, seed: int = 0) -> FeatureBank:
    """``bank`` with every train feature of ``model_id`` replaced by a fresh draw of its
    cell (the fitted cell mean plus within-cell variation); held-out rows stay real.

    A head trained on the twin and tested on the real held-out rows, against one trained on
    the real train rows: how well the model captures what a head learns from features.
    Needs ``model`` fitted on this bank's ``model_id`` (its labels index the identities).
    """
    m = bank.model_index(model_id)
    rows = np.flatnonzero((bank.models == m) & ~bank.holdout)
    labels = bank.labels[rows].astype(np.int64)
    position = np.searchsorted(model.identities, labels)
    if (position >= model.identities.size).any() or not np.array_equal(
        model.identities[np.minimum(position, model.identities.size - 1)], labels
    ):
        raise ConfigError(f"the feature model was not fitted on {model_id}'s identities")
    rng = rng_for(seed, _TRAIN)
    centres = model.fitted_centres(rng)
    features = bank.features.copy()
    plan = _Plan(position, bank.domains[rows].astype(np.int64))
    own = np.arange(model.identities.size, dtype=np.int64)
    features[rows] = _sample(model, centres, own, plan, rng)
    spec = {**bank.spec, "twin_of": bank.key, "twin_seed": seed, "twin_model": model_id}
    meta = {**bank.meta, "spec": spec, "key": _key(spec)}
    copy = bank.with_features(features, meta, Path(f"twin-{bank.key[:16]}"))
    meta["content_sha256"] = content_sha256(
        {name: getattr(copy, name) for name in ("features", "labels", "models", "domains")}
        | {"image_index": copy.image_index, "holdout": copy.holdout.astype(np.uint8)}
    )
    return copy


def in_memory_bank(
    spec: dict[str, object],
    world: World,
    features: npt.NDArray[np.float16],
    labels: npt.NDArray[np.int64],
    domains: npt.NDArray[np.int64],
    holdout: npt.NDArray[np.bool_],
    *,
    vendors: list[str],
) -> FeatureBank:
    """A :class:`FeatureBank` of one model held in memory (never written)."""
    model_id = world.model_ids[0]
    labels32 = labels.astype(np.int32)
    models = np.zeros(labels.size, dtype=np.int32)
    domains8 = domains.astype(np.uint8)
    image_index = _image_index(labels, domains, holdout)
    columns: dict[str, np.ndarray] = {
        "features": features,
        "labels": labels32,
        "models": models,
        "domains": domains8,
        "image_index": image_index,
        "holdout": holdout.astype(np.uint8),
    }
    key = _key(spec)
    meta: dict[str, object] = {
        "spec": spec,
        "key": key,
        "models": [model_id],
        "identities": {model_id: list(world.identity_names(model_id))},
        "pretrain_identities": {model_id: world.pretrain_identities(model_id).tolist()},
        "device_identities": {model_id: world.device_identities(model_id).tolist()},
        "vendors": vendors,
        "num_classes": world.config.identities,
        "feature_shape": list(features.shape[1:]),
        "content_sha256": content_sha256(columns),
    }
    return FeatureBank(
        path=Path(f"expanded-{key[:16]}"),
        meta=meta,
        features=features,
        labels=labels32,
        models=models,
        domains=domains8,
        image_index=image_index,
        holdout=holdout.astype(np.bool_),
        from_cache=False,
    )


def _key(spec: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def _image_index(
    labels: npt.NDArray[np.int64], domains: npt.NDArray[np.int64], holdout: npt.NDArray[np.bool_]
) -> npt.NDArray[np.int32]:
    """A running index within each (identity, domain) cell, train rows first: every row of
    a cell is its own "image"."""
    key = labels * 256 + domains
    order = np.lexsort((holdout, key))
    sorted_key = key[order]
    starts = np.flatnonzero(np.r_[True, sorted_key[1:] != sorted_key[:-1]])
    run = np.arange(key.size) - np.repeat(starts, np.diff(np.r_[starts, key.size]))
    index = np.empty(key.size, dtype=np.int32)
    index[order] = run
    return index


def rows_of_world(config: ExpansionConfig, vendors: int) -> dict[str, int]:
    """Row counts of the expanded world, without building it (for plans and docs)."""
    world = split_world(config, vendors)
    pretrain = int(world.pretrain_identities(config.model_id).size)
    device = int(world.device_identities(config.model_id).size)
    return {
        "pretrain_train": pretrain * config.pretrain_rows,
        "pretrain_holdout": pretrain * config.pretrain_holdout,
        "device_train": config.device_rows,
        "device_holdout": device * vendors * config.device_holdout,
    }
