"""The lifecycle every long-lived component shares: ``start()``, an idempotent
``stop()``, and ``async with`` that pairs them (aiokafka's producer is the model)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Self


class Service:
    """Base of long-lived components: subclasses implement ``start`` and ``stop``;
    ``async with`` starts on entry and always stops on exit."""

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


@contextlib.contextmanager
def stop_on_signals(
    on_signal: Callable[[], object], signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)
) -> Iterator[None]:
    """For entry points only: call ``on_signal`` (e.g. an ``asyncio.Event``'s ``set``) on
    SIGINT/SIGTERM while the block runs, in the running event loop; the handlers are
    removed on exit. Where the loop cannot install them (not the main thread, Windows),
    nothing is installed."""
    loop = asyncio.get_running_loop()
    installed = []
    for sig in signals:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, on_signal)
            installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
