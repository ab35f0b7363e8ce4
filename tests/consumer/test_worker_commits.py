"""A revocation's commit and the loop's never overlap.

aiokafka calls the rebalance listener from its own group task, so a revocation can come while
the consume loop is inside a commit; with `exactly_once` that commit is a Kafka transaction,
and aiokafka's producer refuses to begin a second one while the first is open (an
AssertionError, not a KafkaError). The revocation then died before forgetting its partitions,
and a later commit repeated, under the old owner, outcomes the new owner had redone.

The Kafka transaction itself runs against a broker in tests/producer/test_transactions.py; here a
stand-in holds the loop's transaction open for as long as the test wants, which no broker can
be made to do on cue.
"""

import asyncio
from collections.abc import Iterable, Mapping
from types import SimpleNamespace
from typing import Any, cast

from aiokafka import AIOKafkaConsumer, TopicPartition

from consumer.settings import WorkerSettings
from consumer.worker import Worker

REVOKED = TopicPartition("requests", 0)
KEPT = TopicPartition("requests", 1)


class HeldTransactions:
    """Commits like the transactional publisher; the first stays open until `release` is set,
    and beginning one while another is open fails as aiokafka's producer does."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.opened = asyncio.Event()
        self.committed: list[dict[TopicPartition, int]] = []
        self.forgotten: list[set[TopicPartition]] = []
        self._open = False

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        if self._open:
            raise AssertionError("Invalid state transition IN_TRANSACTION -> IN_TRANSACTION")
        self._open = True
        self.opened.set()
        try:
            if not self.committed:
                await self.release.wait()
            self.committed.append(dict(offsets))
        finally:
            self._open = False

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        self.forgotten.append(set(partitions))


class IdleHandler:
    """Never given a record: the test calls the commits itself."""


def member_consumer() -> AIOKafkaConsumer:
    """A consumer as far as the commit looks at one: a member of its group's generation 1."""
    return cast(AIOKafkaConsumer, SimpleNamespace(_coordinator=SimpleNamespace(generation=1)))


async def test_a_revocation_waits_for_the_loops_transaction_then_forgets_its_partitions() -> None:
    transactions = HeldTransactions()
    handler = cast(Any, IdleHandler())
    consumer = member_consumer()
    worker = Worker(WorkerSettings(), consumer, handler, transactions=cast(Any, transactions))
    for tp in (REVOKED, KEPT):
        worker._tracker.track(tp, 0)
        worker._tracker.done(tp, 0)

    loop_commit = asyncio.create_task(worker._commit(consumer))
    await transactions.opened.wait()
    revocation = asyncio.create_task(worker.on_revoked({REVOKED}))
    await asyncio.sleep(0.05)
    assert not revocation.done()  # waiting for the loop's transaction, not failing beside it
    transactions.release.set()
    await asyncio.wait_for(asyncio.gather(loop_commit, revocation), timeout=5)

    assert transactions.committed == [{REVOKED: 1, KEPT: 1}]
    assert transactions.forgotten == [{REVOKED}]
    assert worker._tracker.partitions() == [KEPT]
