"""Preparing a fleet run: its feature bank, its models on the model topic, its devices and
where their features come from.

Pure preparation, shared by the runner (:mod:`device_sim.fleet`), the shard parent
(:mod:`device_sim.shards`) and the benchmark.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from device_sim.devices import DeviceFleet
from pipeline.errors import ConfigError
from pipeline.records import Backbone, ModelMetrics
from pipeline.settings import Settings

if TYPE_CHECKING:
    from device_sim.bank import FeatureBank
    from device_sim.fleet_config import FleetConfig
    from device_sim.live import LiveFeatures
    from device_sim.world import World

log = logging.getLogger(__name__)


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``5m``, ``1.5h`` → seconds."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    value = text.strip().lower()
    scale = units.get(value[-1:])
    try:
        seconds = float(value[:-1] if scale is not None else value) * (scale or 1.0)
    except ValueError:
        raise ConfigError(f"duration {text!r} is not like 90, 90s, 5m or 1.5h") from None
    if seconds <= 0 or not math.isfinite(seconds):
        raise ConfigError(f"duration {text!r} must be > 0")
    return seconds


def load_bank(settings: Settings, config: FleetConfig, *, progress: bool = False) -> FeatureBank:
    """The feature bank of the run's world: from ``$FEDEX_HOME/banks``, built if missing,
    through the pretrained backbone unless the config says ``weights="none"``."""
    from device_sim.bank import build_bank
    from device_sim.world import World
    from pipeline.facenet_weights import resolve_weights

    weights = resolve_weights(settings.home, config.weights)
    return build_bank(
        World(config.world_config()),
        backbone=config.backbone,
        cut=config.cut,
        weights=weights if Backbone(config.backbone) is Backbone.INCEPTION_RESNET_V1 else None,
        out=settings.bank_dir,
        progress=progress,
    )


def bank_weights(settings: Settings, bank: FeatureBank) -> Path | None:
    """The pretrained weights file the bank was built with (its thawed layers start from
    it too), or ``None`` for a random-init bank or one built from another file."""
    from device_sim.bank import file_sha256
    from pipeline.facenet_weights import weights_path

    digest = bank.spec.get("weights_sha256")
    path = weights_path(settings.home)
    if digest is None or not path.is_file() or file_sha256(path) != digest:
        return None
    return path


async def ensure_models(settings: Settings, bank: FeatureBank, model_ids: list[str]) -> None:
    """Every model exists on the model topic: its base head v0 (trained on the bank's
    pre-training identities, clean domain) is registered unless it already is."""
    from device_sim.heads import train_base_head
    from pipeline.publishing import register_model
    from pipeline.registry import RegistryFollower
    from pipeline.topics import Topics, ensure_topics, topic_specs

    await ensure_topics(settings.bootstrap, topic_specs(settings))
    async with RegistryFollower(
        bootstrap=settings.bootstrap,
        topic=Topics(settings.topic_prefix).models,
        client_id="fedex-fleet-setup",
    ) as follower:
        await follower.wait_caught_up()
        missing = [m for m in model_ids if m not in follower.registry]
    for model_id in sorted(set(model_ids) - set(missing)):
        log.info("model %s exists: its versions are left as they are", model_id)
    weights = bank_weights(settings, bank)
    for model_id in missing:  # only these need a base head trained
        base = await asyncio.to_thread(train_base_head, bank, model_id, weights=weights)
        metrics = ModelMetrics(
            val_accuracy=base.pretrain_val_accuracy,
            champion_val_accuracy=None,
            train_samples=base.train_samples,
            val_samples=0,
            train_seconds=base.train_seconds,
            epochs=30,
        )
        update = await register_model(
            settings,
            model_id,
            bank.backbone,
            bank.cut,
            bank.num_classes,
            head_state=base.state_dict,
            metrics=metrics,
            exist_ok=True,
        )
        log.info("model %s: %s registered (sha256 %s)", model_id, update.version, update.sha256)


def build_fleet(world: World, config: FleetConfig, num_classes: int) -> DeviceFleet:
    """This shard's devices, their profiles from the world (the same in any process)."""
    model_ids = list(world.model_ids)
    g = np.arange(config.shard_index, config.count, config.shard_count, dtype=np.int64)
    model_of = g % len(model_ids)
    vendors, identities = [], []
    for gi, m in zip(g.tolist(), model_of.tolist(), strict=True):
        model_id = model_ids[m]
        profile = world.device_profile(model_id, f"{model_id}-dev{gi:06d}")
        vendors.append(profile.vendor)
        identities.append(profile.identities)
    return DeviceFleet(
        model_ids=model_ids,
        model_of=model_of,
        vendor=np.asarray(vendors, dtype=np.int64),
        identities=identities,
        num_classes=num_classes,
        vendors=world.config.vendors,
        global_index=g,
        params=config.params,
        seed=config.seed,
    )


@dataclass(frozen=True)
class FeatureSource:
    """Where a fleet's features come from (``FleetConfig.features``): ``draw(m, devices,
    identities, rng)`` picks the rows of new samples, ``features(rows)`` turns rows into
    the vectors a push carries. ``live`` is set when images are rendered and embedded as
    devices need them (then inference runs off the event loop)."""

    draw: Callable[..., Any]
    features: Callable[[Any], Any]
    live: LiveFeatures | None = None


def attach_features(
    config: FleetConfig,
    world: World,
    bank: FeatureBank,
    fleet: DeviceFleet,
    rng: np.random.Generator,
) -> FeatureSource:
    """Build ``config.features``'s source for ``fleet`` and seed the devices' backlogs from
    it with ``rng`` (the fleet's generator: what it draws here fixes every later draw)."""
    cfg = config
    # Each source imports only when chosen: live loads a backbone, fresh fits a model.
    if cfg.features == "live":
        from device_sim.live import LiveFeatures

        p = cfg.params
        live = LiveFeatures(
            world,
            cfg.backbone,
            cfg.cut,
            vendors=fleet.vendor,
            capacity=fleet.n * (p.cache_capacity + p.push_max) + 64,
        )
        fleet.release = live.release
        return FeatureSource(live.draw, live.features, live)
    if cfg.features == "fresh":
        from device_sim.fresh import FreshFeatures

        fresh = FreshFeatures(bank, vendors=fleet.vendor, seed=cfg.seed * 65_537 + cfg.shard_index)
        fleet.seed_backlog(fresh.draw, rng, now=0.0)
        return FeatureSource(fresh.draw, fresh.features)
    model_ids = list(world.model_ids)

    def draw(m: int, devices: Any, identities: Any, rng: np.random.Generator) -> Any:
        rows = bank.draw_batch(model_ids[m], fleet.vendor[devices], identities[:, None], 1, rng)
        return rows[:, 0]

    fleet.seed_backlog(draw, rng, now=0.0)
    return FeatureSource(draw, lambda rows: bank.features[rows])
