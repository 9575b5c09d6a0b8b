"""Which trigger partitions a trainer owns, kept from its consumer group's rebalances.

A job runs for minutes; the group may move its trigger's partition meanwhile. Before
publishing, the trainer asks :meth:`PartitionOwnership.owns` so that a rebalance mid-job
yields one version (the partition's new owner retrains it or finds it published). Apart
from :mod:`trainer.worker` because it is the one piece fed by aiokafka's callbacks rather
than by the trainer's own loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aiokafka import ConsumerRebalanceListener
    from aiokafka.structs import TopicPartition


class PartitionOwnership:
    """The partitions this member holds, and whether the group is between rebalances."""

    def __init__(self) -> None:
        self.assigned: set[TopicPartition] = set()
        self.stable = asyncio.Event()

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self.stable.clear()
        self.assigned -= set(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.assigned = set(assigned)
        self.stable.set()

    async def owns(self, tp: TopicPartition, timeout: float) -> bool:
        """Whether ``tp`` is still ours, once a rebalance in progress settles (at most
        ``timeout`` seconds; unsettled reads as not ours)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stable.wait(), timeout)
        return self.stable.is_set() and tp in self.assigned

    def listener(self) -> ConsumerRebalanceListener:
        """The listener to subscribe with, forwarding the group's callbacks here."""
        # Imported here: aiokafka loads only once a trainer starts (the CLI stays light).
        from aiokafka import ConsumerRebalanceListener

        ownership = self

        class Listener(ConsumerRebalanceListener):
            async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
                await ownership.on_partitions_revoked(revoked)

            async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
                await ownership.on_partitions_assigned(assigned)

        return Listener()
