"""The world's backbone: the zoo's architecture with the weights a bank is built with.

Random weights (the default without a weights file) give features that separate the
world's identities poorly unless calibrated: :func:`build_world_backbone` scales the
residual branches and calibrates batch norm on images of the world, deterministically, so
every process building the same world gets the same prefix. :func:`extract_features` runs
a prefix on a batch of images.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from device_sim.images import CLEAN_DOMAIN, to_backbone_input
from device_sim.world import ImageGroup, World
from pipeline.records import Backbone, Cut
from pipeline.zoo import Split, build_backbone, split


def build_world_backbone(
    world: World,
    backbone: Backbone | str,
    cut: Cut | str,
    *,
    weights: Path | None = None,
    seed: int = 0,
    calibration_images: int = 64,
) -> Split:
    """The backbone split every device of ``world`` runs: the bank's features and live
    features both come from this prefix.

    With ``weights`` (e.g. facenet's VGGFace2 file) it is that model as is. Without, the
    model is randomly initialised (:func:`pipeline.zoo.build_backbone`, ``seed``) and its
    BatchNorm statistics are calibrated on ``calibration_images`` clean pre-training images
    of the world: a random network with BatchNorm's default statistics (mean 0, variance 1)
    lets activations vanish or explode layer after layer (MobileNetV2's embedding comes out
    ~1e-9), while calibrated statistics make it a well-conditioned random-feature extractor,
    fitted to the pre-training domain like a pretrained one. Deterministic in its inputs.
    """
    backbone, cut = Backbone(backbone), Cut(cut)
    model = build_backbone(
        backbone, num_classes=world.config.identities, weights=weights, seed=seed
    )
    if weights is None:
        if backbone is Backbone.MOBILENET_V2:
            scale_residual_branches(model, RANDOM_RESIDUAL_SCALE)
        if calibration_images > 0:
            calibrate_batchnorm(model, _calibration_batches(world, calibration_images))
    return split(model, backbone, cut)


#: Residual-branch scale of a random MobileNetV2 (see :func:`scale_residual_branches`).
RANDOM_RESIDUAL_SCALE = 0.1


@torch.no_grad()
def scale_residual_branches(model: nn.Module, scale: float) -> None:
    """Scale the output BatchNorm of every residual block of a MobileNetV2 by ``scale``.

    Inception-ResNet scales its residual branches by 0.1–0.2 by design; torchvision's
    MobileNetV2 does not, and ten random residual branches at full scale scramble the
    input's similarity structure (identities become barely separable after pooling). A
    random MobileNetV2 is only a stand-in for a pretrained one, so it gets the same scaling
    Inception-ResNet has. It scales the affine weights, so it survives calibration.
    """
    for block in model.modules():
        if getattr(block, "use_res_connect", False):
            last = list(block.get_submodule("conv").children())[-1]
            assert isinstance(last, nn.BatchNorm2d)
            last.weight.mul_(scale)
            last.bias.mul_(scale)


def _calibration_batches(world: World, count: int, batch: int = 32) -> Iterator[Tensor]:
    clean = [g for g in world.groups() if g.domain == CLEAN_DOMAIN]
    picks: list[tuple[ImageGroup, int]] = []
    depth = max(len(g.indices) for g in clean)
    for k in range(depth):  # round-robin over identities: every one weighs the same
        picks.extend((g, g.indices[k]) for g in clean if k < len(g.indices))
    picks = picks[:count]
    for start in range(0, len(picks), batch):
        chunk = picks[start : start + batch]
        yield torch.cat(
            [
                world.images(world.model_ids[g.model_index], g.identity, g.domain, [i])
                for g, i in chunk
            ]
        )


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, batches: Iterator[Tensor]) -> None:
    """Set every BatchNorm's running statistics to the cumulative average over ``batches``
    (images in [0, 1]); nothing else changes and the model ends in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
        m.train()
    seen = 0
    for images in batches:
        if images.shape[0] < 2:
            continue
        model(to_backbone_input(images))
        seen += 1
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.eval()
    if not seen:
        raise ValueError("BatchNorm calibration needs at least one batch of ≥ 2 images")


def extract_features(prefix: nn.Module, images: Tensor) -> Tensor:
    """What a device computes: images [n, 3, 160, 160] in [0, 1] → prefix features
    (float32, contiguous). Channels-last input lets oneDNN pick its faster convolutions
    (x1.2 InceptionResnetV1, x1.6 MobileNetV2 on these CPUs); the result is unchanged."""
    x = to_backbone_input(images).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        return prefix(x).float().contiguous()


# --------------------------------------------------------------------------- the bank
