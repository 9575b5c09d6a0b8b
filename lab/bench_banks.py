"""The banks the learning benches run on: the named world configurations, their real
feature bank (built once through the pretrained backbone, then cached), and the expanded
world sampled from a feature model fitted on one (``--scale``).

The Figure 4 sweep, the expansion's fidelity, the paper-sized job and the FedAvg
comparison all start here, so they measure the same worlds.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Final

from device_sim.bank import DEFAULT_BACKBONE, DEFAULT_CUT, FeatureBank, build_bank
from device_sim.world import World, WorldConfig
from pipeline.records import Backbone, Cut

#: A world small enough for tests and smoke runs (MobileNetV2 bank in seconds).
SMALL_WORLD: Final = WorldConfig(
    seed=0,
    models=("faces-1",),
    identities=8,
    pretrain_images=4,
    device_images=4,
    vendors=2,
    identities_per_device=(2, 4),
)
CONFIGS: Final[dict[str, tuple[WorldConfig, Backbone, Cut]]] = {
    "default": (WorldConfig(), DEFAULT_BACKBONE, DEFAULT_CUT),
    "small": (SMALL_WORLD, Backbone.MOBILENET_V2, Cut.FREEZE6),
}


def load_bank(
    config: str, bank_dir: Path, *, seed: int = 0, home: Path | None = None
) -> FeatureBank:
    """The real bank of a named configuration: found in ``bank_dir`` or built there, through
    the pretrained backbone (from ``home``) where the configuration's backbone has it."""
    from pipeline.facenet_weights import PRETRAINED, resolve_weights

    try:
        world_config, backbone, cut = CONFIGS[config]
    except KeyError:
        raise ValueError(f"unknown config {config!r}; use one of {', '.join(CONFIGS)}") from None
    world = World(replace(world_config, seed=seed))
    weights = None
    if home is not None and backbone is Backbone.INCEPTION_RESNET_V1:
        weights = resolve_weights(home, PRETRAINED)
    return build_bank(
        world, backbone=backbone, cut=cut, weights=weights, out=bank_dir, progress=True
    )


def parse_scale(text: str | None) -> float | None:
    """``--scale``: none (the real bank), ``paper`` (1.0) or a fraction in (0, 1]."""
    if text is None or text == "none":
        return None
    if text == "paper":
        return 1.0
    try:
        scale = float(text)
    except ValueError:
        raise ValueError(f"--scale must be 'paper' or a number in (0, 1], got {text!r}") from None
    if not 0.0 < scale <= 1.0:
        raise ValueError(f"--scale must be in (0, 1], got {scale}")
    return scale


def expanded_bank(real: FeatureBank, scale: float, *, seed: int = 0) -> tuple[FeatureBank, Any]:
    """The expanded world at ``scale`` of the paper, sampled from a feature model fitted on
    the train rows of ``real``'s first model; and that model."""
    from device_sim.expansion import PAPER, expand
    from device_sim.feature_model import fit

    rows = real.select(real.model_ids[0], holdout=False)
    model = fit(real.features[rows], real.labels[rows], real.domains[rows])
    config = replace(PAPER.scaled(scale), seed=seed)
    bank = expand(model, config, backbone=real.backbone, cut=real.cut, source=real.key)
    return bank, model
