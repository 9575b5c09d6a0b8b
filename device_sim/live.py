"""Live features: devices run the real backbone prefix on freshly rendered images.

``fedex devices --features live`` replaces bank rows by what a phone would compute: for
each labelled inference a *new* image of the identity (an image index no bank holds)
through the device's vendor camera, run through the same prefix the bank was built with
(:func:`device_sim.backbone.build_world_backbone`). At ~30 ms an image on a CPU
(InceptionResnetV1) it serves small fleets only; the bank serves thousands of devices.

Features live in an arena of rows with a free list: a cached sample holds a row until it
is evicted or its push is settled (:attr:`device_sim.devices.DeviceFleet.release`).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch

from device_sim.backbone import build_world_backbone, extract_features
from device_sim.world import World
from pipeline.errors import FedexError
from pipeline.records import Backbone, Cut

#: Image indices of live photos start here, beyond any bank's (so none is held out).
FIRST_LIVE_IMAGE = 1_000_000


class LiveFeatures:
    """Row store of live features; ``draw`` matches :data:`device_sim.devices.DrawRows`."""

    def __init__(
        self,
        world: World,
        backbone: Backbone | str,
        cut: Cut | str,
        *,
        vendors: npt.ArrayLike,
        capacity: int,
        batch: int = 32,
    ) -> None:
        self.world = world
        self.prefix = build_world_backbone(world, backbone, cut).prefix.eval()
        self.vendor = np.asarray(vendors, dtype=np.int64)
        self.batch = batch
        self.rows: npt.NDArray[np.float16] | None = None
        self.capacity = capacity
        self._free = list(range(capacity - 1, -1, -1))
        self._next_image = FIRST_LIVE_IMAGE
        self.images = 0

    def draw(
        self,
        model_index: int,
        devices: npt.NDArray[np.int64],
        identities: npt.NDArray[np.int64],
        rng: np.random.Generator,
    ) -> npt.NDArray[np.int64]:
        model_id = self.world.model_ids[model_index]
        if len(self._free) < devices.size:
            raise FedexError(f"live feature store full ({self.capacity} rows): use a smaller fleet")
        images = []
        for device, identity in zip(devices.tolist(), identities.tolist(), strict=True):
            domain = int(self.vendor[device])
            images.append(self.world.images(model_id, identity, domain, [self._next_image]))
            self._next_image += 1
        out = np.zeros(devices.size, dtype=np.int64)
        x = torch.cat(images) if images else torch.zeros(0)
        for start in range(0, devices.size, self.batch):
            features = extract_features(self.prefix, x[start : start + self.batch])
            f16 = features.to(torch.float16).numpy()
            if self.rows is None:
                self.rows = np.zeros((self.capacity, *f16.shape[1:]), dtype=np.float16)
            for i in range(f16.shape[0]):
                row = self._free.pop()
                self.rows[row] = f16[i]
                out[start + i] = row
        self.images += devices.size
        return out

    def features(self, rows: npt.NDArray[np.int64]) -> npt.NDArray[np.float16]:
        assert self.rows is not None
        return self.rows[rows]

    def release(self, rows: npt.NDArray[np.int64]) -> None:
        self._free.extend(np.asarray(rows, dtype=np.int64).tolist())
