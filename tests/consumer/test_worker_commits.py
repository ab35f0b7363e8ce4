"""A revocation's commit and the loop's never overlap.

aiokafka calls the rebalance listener from its own group task, so a revocation can come while
the consume loop is inside a commit; with `exactly_once` that commit is a Kafka transaction,
and aiokafka's producer refuses to begin a second one while the first is open (an
AssertionError, not a KafkaError). The revocation then died before letting go of its
partitions, and a later commit repeated, under the old owner, outcomes the new owner had redone.

The Kafka transactions themselves run against a broker in tests/producer/test_transactions.py
and tests/consumer/test_fencing.py; here a stand-in for the worker's `Commits` holds the loop's
transaction open for as long as the test wants, which no broker can be made to do on cue.
"""

import asyncio
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any, cast

from aiokafka import AIOKafkaConsumer, TopicPartition

from consumer.settings import WorkerSettings
from consumer.worker import Worker

REVOKED = TopicPartition("requests", 0)
KEPT = TopicPartition("requests", 1)


class HeldTransactions:
    """Commits like `TransactionalCommits`; the first stays open until `release` is set, and
    beginning one while another is open fails as aiokafka's producer does."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.opened = asyncio.Event()
        self.committed: list[dict[TopicPartition, int]] = []
        self.revoked_ones: list[set[TopicPartition]] = []
        self._open = False

    async def assigned(self, consumer: AIOKafkaConsumer, partitions: set[TopicPartition]) -> None:
        pass

    async def commit(
        self, consumer: AIOKafkaConsumer, offsets: Mapping[TopicPartition, int]
    ) -> Mapping[TopicPartition, int]:
        if self._open:
            raise AssertionError("Invalid state transition IN_TRANSACTION -> IN_TRANSACTION")
        self._open = True
        self.opened.set()
        try:
            if not self.committed:
                await self.release.wait()
            self.committed.append(dict(offsets))
            return offsets
        finally:
            self._open = False

    async def revoked(self, partitions: set[TopicPartition]) -> None:
        self.revoked_ones.append(partitions)


class IdleHandler:
    """Never given a record: the test calls the commits itself."""


async def test_a_revocation_waits_for_the_loops_transaction_then_lets_go_of_its_partitions() -> (
    None
):
    transactions = HeldTransactions()
    handler = cast(Any, IdleHandler())
    consumer = cast(AIOKafkaConsumer, SimpleNamespace())  # the stand-in never looks at it
    worker = Worker(WorkerSettings(), consumer, handler, commits=transactions)
    for tp in (REVOKED, KEPT):
        worker._tracker.track(tp, 0)
        worker._tracker.done(tp, 0)

    loop_commit = asyncio.create_task(worker._commit())
    await transactions.opened.wait()
    revocation = asyncio.create_task(worker.on_revoked({REVOKED}))
    await asyncio.sleep(0.05)
    assert not revocation.done()  # waiting for the loop's transaction, not failing beside it
    transactions.release.set()
    await asyncio.wait_for(asyncio.gather(loop_commit, revocation), timeout=5)

    assert transactions.committed == [{REVOKED: 1, KEPT: 1}]
    assert transactions.revoked_ones == [{REVOKED}]
    assert worker._tracker.partitions() == [KEPT]
