"""The lifecycle every long-lived component shares: ``start()``, an idempotent
``stop()``, and ``async with`` that pairs them (aiokafka's producer is the model)."""

from __future__ import annotations

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
