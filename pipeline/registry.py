"""The model registry: latest, best and history per model, folded from the model topic.

The model topic is the system of record; every actor that needs to know which models
exist (agents validating labels, trainers warm-starting from the best, the model server,
device fleets) folds the same updates with :class:`Registry` (pure) and follows the
topic with :class:`RegistryFollower` (the Kafka shell).

A model exists once its first update (the base model, version ``v0`` by convention) is
on the topic: that update names its backbone, cut and number of classes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass
from pipeline import codec
from pipeline.errors import FedexError
from pipeline.lifecycle import Service
from pipeline.records import Backbone, Cut, ModelUpdate
from pipeline.tail import TopicTail, wait_until

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ModelEntry:
    """What the registry knows of one model. Updates are kept without inline blobs."""

    model_id: str
    backbone: Backbone
    cut: Cut
    num_classes: int
    history: list[ModelUpdate] = field(default_factory=list)
    latest: ModelUpdate | None = None
    best: ModelUpdate | None = None

    def version(self, version: str) -> ModelUpdate | None:
        for update in self.history:
            if update.version == version:
                return update
        return None


class Registry:
    """Pure fold of model updates. Re-applying an update is a no-op (at-least-once topics)."""

    def __init__(self) -> None:
        self._models: dict[str, ModelEntry] = {}
        self._seen: set[tuple[str, str]] = set()

    def apply(self, update: ModelUpdate) -> bool:
        """Folds one update; returns False if that version was already known."""
        key = (update.model_id, update.version)
        if key in self._seen:
            return False
        self._seen.add(key)
        slim = replace(update, checkpoint=None)
        entry = self._models.get(update.model_id)
        if entry is None:
            entry = ModelEntry(update.model_id, update.backbone, update.cut, update.num_classes)
            self._models[update.model_id] = entry
        entry.history.append(slim)
        entry.latest = slim
        if slim.is_best or entry.best is None:
            entry.best = slim
        return True

    def get(self, model_id: str) -> ModelEntry | None:
        return self._models.get(model_id)

    def models(self) -> list[ModelEntry]:
        return [self._models[k] for k in sorted(self._models)]

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._models

    def __len__(self) -> int:
        return len(self._models)


UpdateCallback = Callable[[ModelUpdate], Awaitable[None] | None]


class RegistryFollower(Service):
    """Follows the model topic from its start and keeps a :class:`Registry` current.

    Reads every partition without a consumer group (every follower sees everything).
    ``wait_caught_up()`` returns once the updates that were on the topic at start-up are
    folded; ``sync()`` once those on it *now* are (so a version another process published
    a moment ago is known before acting on it). ``on_update`` is called for each new
    version, blob included, in topic order per model. A bad record is logged and skipped:
    it cannot be re-routed from here, and its producer (a trainer) validated it.
    """

    def __init__(
        self,
        *,
        bootstrap: str,
        topic: str,
        on_update: UpdateCallback | None = None,
        registry: Registry | None = None,
        client_id: str = "fedex-registry",
    ) -> None:
        self.registry = registry or Registry()
        self._topic = topic
        self._on_update = on_update
        self._tail = TopicTail(bootstrap=bootstrap, topic=topic, client_id=client_id)
        self._task: asyncio.Task[None] | None = None
        self.skipped = 0

    async def start(self) -> None:
        if self._task is not None:
            return
        await self._tail.open()
        self._task = asyncio.create_task(self._run(), name="registry-follower")

    async def _run(self) -> None:
        while True:
            for records in (await self._tail.fetch()).values():
                for record in records:
                    await self._fold(record.value)
            await self._tail.advance()

    async def _fold(self, value: bytes | None) -> None:
        if value is None:  # a compaction tombstone
            return
        try:
            update = codec.decode_update(value)
        except codec.CodecError as exc:
            self.skipped += 1
            log.warning("skipping a bad model update: %s", exc)
            return
        if self.registry.apply(update) and self._on_update is not None:
            result = self._on_update(update)
            if result is not None:
                await result

    async def wait_caught_up(self, timeout: float = 30.0) -> None:
        """Return once every update that was on the topic at start-up is folded."""
        tail, task = self._tail, self._task
        if task is None:
            raise FedexError("the registry follower is not started")
        await wait_until(
            lambda: tail.caught_up_with(tail.start_ends),
            lambda: tail.progress,
            task,
            timeout,
            f"registry caught up with {self._topic!r}",
        )

    async def sync(self, timeout: float = 30.0) -> None:
        """Return once every update on the topic at call time is folded."""
        await self._tail.sync(self._task, timeout)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._tail.close()
