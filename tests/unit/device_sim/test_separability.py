"""The world is not trivially separable: raw pixels do not tell its identities apart.

Nearest-centroid on 16×16 downsampled pixels of the devices' images (centroids from the
first half of each identity's images through each vendor's camera, tested on the second
half, across all vendors) is what an outside check scored 100% on the easy world. At the
default ``variation`` it must be far below that yet above chance (so the check can fail
both ways), and at ``variation`` 0 it must still be near 100% (so the knob is what makes
the difference).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import numpy.typing as npt
from torch.nn import functional as F

from device_sim.world import World, WorldConfig

IDENTITIES = 16
WORLD = WorldConfig(
    seed=3,
    models=("faces-a",),
    identities=IDENTITIES,
    pretrain_images=1,
    device_images=6,
    vendors=4,
)


def _pixels(world: World) -> tuple[list[npt.NDArray[np.float32]], list[int], list[int]]:
    """16×16 thumbnails of every device image, their identity and their half (0 / 1)."""
    model_id = world.model_ids[0]
    rows: list[npt.NDArray[np.float32]] = []
    labels: list[int] = []
    halves: list[int] = []
    for group in world.groups():
        if group.domain == 0:
            continue
        images = world.images(model_id, group.identity, group.domain, group.indices)
        thumbs = F.adaptive_avg_pool2d(images, 16).reshape(len(images), -1).numpy()
        rows.extend(thumbs)
        labels.extend([group.identity] * len(thumbs))
        halves.extend(int(2 * k >= len(thumbs)) for k in range(len(thumbs)))
    return rows, labels, halves


def raw_pixel_accuracy(world: World) -> float:
    """Nearest-centroid accuracy on raw 16×16 pixels, first half → second half."""
    rows, labels, halves = _pixels(world)
    x, y, half = np.stack(rows), np.asarray(labels), np.asarray(halves)
    classes = np.unique(y)
    centroids = np.stack([x[(y == c) & (half == 0)].mean(0) for c in classes])
    test, truth = x[half == 1], y[half == 1]
    distances = ((test[:, None, :] - centroids[None]) ** 2).sum(-1)
    return float((classes[distances.argmin(1)] == truth).mean())


def test_raw_pixels_do_not_separate_identities() -> None:
    accuracy = raw_pixel_accuracy(World(WORLD))
    chance = 1 / IDENTITIES
    # Measured 0.27 here (0.23 and 0.24 with seeds 0 and 1); chance is 0.0625, and the
    # same world at variation 0 scores 1.0.
    assert 2 * chance < accuracy < 0.5, accuracy


def test_the_easy_world_is_trivially_separable() -> None:
    accuracy = raw_pixel_accuracy(World(replace(WORLD, variation=0.0)))
    assert accuracy >= 0.95, accuracy
