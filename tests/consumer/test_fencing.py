"""Exactly once across a partition's change of owner, on the real broker: a worker that lost its
partition without being told (a "zombie") cannot commit for it once the new owner has it.

aiokafka sends transactional offsets without the group's generation, so only the transactional
id can fence the zombie: one producer per request partition, the same id whichever worker holds
it. Two members of one consumer group here; `TransactionalCommits` does what the worker's
rebalance listener and commit path do with it.
"""

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener

from consumer.worker import TransactionalCommits
from producer.publisher import RecordSource
from producer.settings import KafkaSettings
from producer.transactions import TransactionalPublisher
from schemas.topics import Topics
from schemas.wire_format import make_codec
from tests.fixtures.kafka import TopicFactory
from tests.fixtures.worker import fresh_topics
from tests.producer.test_transactions import committed_offset, committed_outcomes, failed

pytestmark = pytest.mark.timeout(90)

REQUESTS = 2


@pytest.fixture
async def topics(topic_factory: TopicFactory) -> Topics:
    """A requests topic of one partition: whoever holds it, holds all the work."""
    return await fresh_topics(topic_factory, requests_partitions=1)


@pytest.fixture
async def requests(kafka_bootstrap: str, topics: Topics) -> TopicPartition:
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        for n in range(REQUESTS):
            await producer.send_and_wait(topics.requests, f"request {n}".encode())
    finally:
        await producer.stop()
    return TopicPartition(topics.requests, 0)


Assigned = Callable[[set[TopicPartition]], Awaitable[None]]


class Listener(ConsumerRebalanceListener):
    def __init__(self, assigned: Assigned) -> None:
        self._assigned = assigned

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        pass

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._assigned(set(assigned))


class Member:
    """One worker as far as committing goes: a group member with its transactional commits."""

    def __init__(self, bootstrap: str, topics: Topics, group_id: str) -> None:
        self.topics, self.group_id = topics, group_id
        self.publisher = TransactionalPublisher(
            KafkaSettings(bootstrap_servers=bootstrap), topics, make_codec(), group_id, group_id
        )
        self.commits = TransactionalCommits(self.publisher)
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
        )
        self._read: list[ConsumerRecord] = []

    async def join(self, on_assigned: Assigned | None = None) -> None:
        """Join the group and wait until a partition is ready to read; it stays paused (as the
        worker's are while they are made ready) until `work`. `on_assigned` runs before the
        fence."""
        ready = asyncio.Event()

        async def assigned(partitions: set[TopicPartition]) -> None:
            self.consumer.pause(*partitions)
            if on_assigned is not None:
                await on_assigned(partitions)
            await self.commits.assigned(self.consumer, partitions)
            ready.set()

        await self.publisher.start()
        await self.consumer.start()
        self.consumer.subscribe([self.topics.requests], listener=Listener(assigned))
        async with asyncio.timeout(30):
            while not ready.is_set():
                await self._poll()

    async def work(self, records: int) -> None:
        """Read `records` requests and stage an outcome for each."""
        self.consumer.resume(*self.consumer.assignment())
        async with asyncio.timeout(30):
            while len(self._read) < records:
                await self._poll()
        for record in self._read:
            source = RecordSource(record.topic, record.partition, record.offset)
            await self.publisher.publish(failed(f"r{record.offset}"), source=source)

    async def _poll(self) -> None:
        for batch in (await self.consumer.getmany(timeout_ms=100)).values():
            self._read.extend(batch)

    async def commit(self, tp: TopicPartition, offset: int) -> dict[TopicPartition, int]:
        return dict(await self.commits.commit(self.consumer, {tp: offset}))

    async def leave(self) -> None:
        await self.consumer.stop()

    async def stop(self) -> None:
        await self.consumer.stop()
        await self.publisher.stop()


@pytest.fixture
async def members(kafka_bootstrap: str, topics: Topics) -> AsyncIterator[Callable[[], Member]]:
    group_id = f"fence-{uuid.uuid4().hex[:8]}"
    made: list[Member] = []

    def member() -> Member:
        made.append(Member(kafka_bootstrap, topics, group_id))
        return made[-1]

    yield member
    for one in made:
        await one.stop()


async def test_a_zombies_late_commit_is_fenced_and_every_outcome_is_seen_once(
    kafka_bootstrap: str,
    topics: Topics,
    requests: TopicPartition,
    members: Callable[[], Member],
) -> None:
    zombie, owner = members(), members()
    await zombie.join()
    await zombie.work(REQUESTS)
    # The zombie's consumer is out of the group (evicted, say, while stalled); its commit
    # path was not told and still holds the staged outcomes.
    await zombie.leave()

    await owner.join()
    await owner.work(REQUESTS)  # from the committed offset: none yet, so all of them again
    assert await owner.commit(requests, REQUESTS) == {requests: REQUESTS}

    assert await zombie.commit(requests, REQUESTS) == {}  # fenced: no error, nothing in

    assert zombie.publisher.staged == 0
    seen = await committed_outcomes(kafka_bootstrap, topics)
    assert sorted(seen) == [f"r{n}" for n in range(REQUESTS)]
    assert await committed_offset(kafka_bootstrap, owner.group_id, requests) == REQUESTS


async def test_the_new_owner_reads_its_position_after_the_fence(
    kafka_bootstrap: str,
    topics: Topics,
    requests: TopicPartition,
    members: Callable[[], Member],
) -> None:
    # The zombie commits after aiokafka fetched the new owner's position from the committed
    # offset but before the new owner's producer fenced it: that commit is in, so the new
    # owner must start after it, not redo what it covers.
    zombie, owner = members(), members()
    await zombie.join()
    await zombie.work(REQUESTS)
    await zombie.leave()

    async def zombie_commits_late(assigned: set[TopicPartition]) -> None:
        assert await owner.consumer.position(requests) == 0  # read before the fence
        assert await zombie.commit(requests, REQUESTS) == {requests: REQUESTS}

    await owner.join(on_assigned=zombie_commits_late)

    assert await owner.consumer.position(requests) == REQUESTS
    assert sorted(await committed_outcomes(kafka_bootstrap, topics)) == ["r0", "r1"]
