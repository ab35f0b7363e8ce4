"""How the worker commits what it finished: chosen once, with the processing guarantee.

`Commits` is what the consume loop calls, knowing nothing of the guarantee: `commit` with the
offsets below which every request of a partition is done, `assigned` and `revoked` from the
rebalance listener. `PlainCommits` (`at_least_once`) commits offsets through the consumer, the
outcomes being acknowledged already; `TransactionalCommits` (`exactly_once`) commits them in
each partition's transaction with the outcomes staged below them (producer/transactions.py).
"""

import asyncio
from collections.abc import Mapping
from typing import Protocol

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaTimeoutError

from producer.transactions import TransactionalPublisher


class Commits(Protocol):
    async def assigned(self, consumer: AIOKafkaConsumer, partitions: set[TopicPartition]) -> None:
        """Make newly assigned partitions ready to read; they are paused until this returns."""
        ...

    async def commit(
        self, consumer: AIOKafkaConsumer, offsets: Mapping[TopicPartition, int]
    ) -> Mapping[TopicPartition, int]:
        """Commit `offsets`; returns those committed. Raises KafkaError when it failed."""
        ...

    async def revoked(self, partitions: set[TopicPartition]) -> None:
        """Let go of revoked partitions, after their last commit."""
        ...


class PlainCommits:
    """Offsets committed by the consumer, failing after `timeout_seconds`: aiokafka retries a
    commit for as long as the group coordinator cannot be reached, and would hold the loop (and
    a drain) for as long as an outage lasts, the failure never reported."""

    def __init__(self, timeout_seconds: float) -> None:
        self._timeout = timeout_seconds

    async def assigned(self, consumer: AIOKafkaConsumer, partitions: set[TopicPartition]) -> None:
        pass

    async def commit(
        self, consumer: AIOKafkaConsumer, offsets: Mapping[TopicPartition, int]
    ) -> Mapping[TopicPartition, int]:
        try:
            async with asyncio.timeout(self._timeout):
                await consumer.commit(dict(offsets))
        except TimeoutError:
            raise KafkaTimeoutError(
                f"offset commit not answered within {self._timeout:g} s"
            ) from None
        return offsets

    async def revoked(self, partitions: set[TopicPartition]) -> None:
        pass


class TransactionalCommits:
    """Offsets committed in each partition's transaction, with the outcomes staged below them."""

    def __init__(self, publisher: TransactionalPublisher) -> None:
        self._publisher = publisher

    async def assigned(self, consumer: AIOKafkaConsumer, partitions: set[TopicPartition]) -> None:
        await self._publisher.open(partitions)
        # aiokafka fetches a new partition's committed offset beside the rebalance listener,
        # so it may have read it before the fence: what a fenced owner committed since then
        # would be redone. Read it again now that it can no longer change under us.
        for tp in partitions:
            if (committed := await consumer.committed(tp)) is not None:
                consumer.seek(tp, committed)

    async def commit(
        self, consumer: AIOKafkaConsumer, offsets: Mapping[TopicPartition, int]
    ) -> Mapping[TopicPartition, int]:
        return await self._publisher.commit(offsets)

    async def revoked(self, partitions: set[TopicPartition]) -> None:
        await self._publisher.close(partitions)
