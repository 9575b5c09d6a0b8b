"""Where a job's champion comes from: the best version's checkpoint, kept inline from the
model topic, read from the checkpoint store, or downloaded from the model server with a
token of the trainer's own (a by-reference champion another trainer stored). Always
sha256-checked before it is loaded."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

from torch import Tensor

from pipeline.checkpoints import CheckpointError, CheckpointStore, checkpoint_uri, decode_checkpoint
from pipeline.records import ModelUpdate
from pipeline.registry import ModelEntry, Registry
from trainer.job import JobError

if TYPE_CHECKING:
    from pipeline.settings import Settings


class Champions:
    """The best version's blob per model as it came inline, and how to get one that did
    not."""

    def __init__(self, settings: Settings, store: CheckpointStore) -> None:
        self.settings = settings
        self.store = store
        self._blobs: dict[str, tuple[str, bytes]] = {}

    def keep(self, registry: Registry, update: ModelUpdate, blob: bytes) -> None:
        """Keep ``update``'s inline blob if it is its model's best version now."""
        entry = registry.get(update.model_id)
        if entry is not None and entry.best is not None and entry.best.version == update.version:
            self._blobs[update.model_id] = (update.version, blob)

    async def state(self, entry: ModelEntry) -> dict[str, Tensor]:
        """The champion's head state: its blob kept from the model topic, from the store,
        or downloaded from the model server; sha256-checked."""
        best = entry.best
        assert best is not None
        blob: bytes | None = None
        kept = self._blobs.get(entry.model_id)
        if kept is not None and kept[0] == best.version:
            blob = kept[1]
        if blob is None:
            uri = checkpoint_uri(entry.model_id, best.version)
            with contextlib.suppress(CheckpointError):
                if self.store.exists(uri):
                    blob = await asyncio.to_thread(self.store.get, uri)
        if blob is None and best.checkpoint_uri.startswith(("http://", "https://")):
            blob = await self._download(entry.model_id, best.version, best.sha256)
        if blob is None:
            raise JobError(
                f"checkpoint of the champion {entry.model_id} {best.version} is neither inline, "
                f"in the store at {getattr(self.store, 'root', self.store)}, nor at "
                f"{best.checkpoint_uri}"
            )
        try:
            state, _ = decode_checkpoint(blob, expected_sha256=best.sha256)
        except CheckpointError as exc:
            raise JobError(f"champion {entry.model_id} {best.version}: {exc}") from None
        return state

    async def _download(self, model_id: str, version: str, sha256: str) -> bytes:
        """A champion that is only on the model server (by reference, another trainer's
        store): GET it with a token of our own, signed with the server's secret."""
        import aiohttp

        from pipeline.auth import issue_token
        from pipeline.download import ServerCallError, fetch_checkpoint

        secret = self.settings.auth_secret
        if not secret:
            raise JobError(
                f"the champion {model_id} {version} is only on the model server, which needs "
                "a token: set FEDEX_AUTH_SECRET for the trainer to the server's secret"
            )
        token = issue_token(secret, "trainer", [model_id], 600, time.time())
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
                blob = await fetch_checkpoint(
                    http, self.settings.server_url, token, model_id, version, expected_sha256=sha256
                )
        except ServerCallError as exc:
            raise JobError(f"champion {model_id} {version}: {exc}") from None
        assert blob is not None  # no ETag sent, so never a 304
        return blob
