"""The in-memory Kafka of tests/fixtures/memory_kafka.py behaves as aiokafka's clients do where
our code relies on it: polls bounded by max_records and paused partitions, a wait that an
append ends, a group member's first join and later rebalances (no poll returns records while
one is under way), `assign_since`, and a producer whose failed sends write nothing."""

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import cast

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import IllegalStateError, KafkaTimeoutError

from producer.follow import assign_since
from tests.fixtures.memory_kafka import MemoryKafka

pytestmark = pytest.mark.timeout(10)

T0, T1, T2 = (TopicPartition("t", p) for p in range(3))


def three_partitions() -> MemoryKafka:
    kafka = MemoryKafka()
    kafka.create_topic("t", partitions=3)
    for partition in range(3):
        for i in range(3):
            kafka.append("t", f"{partition}-{i}".encode(), partition=partition)
    return kafka


class Listener(ConsumerRebalanceListener):
    def __init__(self) -> None:
        self.calls: list[tuple[str, set[TopicPartition]]] = []

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self.calls.append(("revoked", set(revoked)))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.calls.append(("assigned", set(assigned)))


async def test_a_poll_takes_at_most_max_records_and_nothing_of_a_paused_partition() -> None:
    consumer = three_partitions().consumer()
    consumer.assign([T0, T1, T2])
    consumer.pause(T1)

    first = await consumer.getmany(max_records=4)
    rest = await consumer.getmany()

    assert {tp: [r.value for r in rs] for tp, rs in first.items()} == {
        T0: [b"0-0", b"0-1", b"0-2"],
        T2: [b"2-0"],
    }
    assert {tp: [r.offset for r in rs] for tp, rs in rest.items()} == {T2: [1, 2]}
    assert (await consumer.position(T1), consumer.paused()) == (0, {T1})
    consumer.seek(T0, 1)
    assert [r.offset for r in (await consumer.getmany(T0))[T0]] == [1, 2]


async def test_an_empty_poll_waits_for_its_timeout_or_until_a_record_is_appended() -> None:
    kafka = MemoryKafka()
    kafka.create_topic("t")
    consumer = kafka.consumer()
    consumer.assign([T0])

    started = time.monotonic()
    assert await consumer.getmany(timeout_ms=200) == {}
    assert time.monotonic() - started >= 0.19
    poll = asyncio.create_task(consumer.getmany(timeout_ms=5_000))
    await asyncio.sleep(0.05)
    kafka.append("t", b"late")
    batch = await asyncio.wait_for(poll, 1)
    assert [r.value for r in batch[T0]] == [b"late"]


async def test_a_member_joins_at_its_first_poll_and_a_rebalance_resumes_from_commits() -> None:
    kafka = three_partitions()
    consumer = kafka.consumer(group_id="g")
    listener = Listener()
    consumer.subscribe(["t"], listener=listener)
    assert consumer.assignment() == set()

    await consumer.getmany(max_records=1)
    await consumer.commit({T0: 1})
    await consumer.rebalance([T0])

    assert listener.calls == [
        ("revoked", set()),
        ("assigned", {T0, T1, T2}),
        ("revoked", {T0, T1, T2}),
        ("assigned", {T0}),
    ]
    assert (await consumer.position(T0), await consumer.committed(T0)) == (1, 1)
    assert kafka.lag("g", "t") == {0: 2, 1: 3, 2: 3}
    with pytest.raises(IllegalStateError):
        await consumer.position(T1)


async def test_a_poll_during_a_rebalance_returns_only_after_the_new_assignment() -> None:
    kafka = three_partitions()
    consumer = kafka.consumer(group_id="g")
    revoking = asyncio.Event()
    finish_revoking = asyncio.Event()

    class SlowRevocation(Listener):
        async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
            if revoked:
                revoking.set()
                await finish_revoking.wait()

    consumer.subscribe(["t"], listener=SlowRevocation())
    await consumer.getmany(T0)  # joined: every partition, T0 read to its end
    rebalance = asyncio.create_task(consumer.rebalance([T1]))
    await revoking.wait()
    poll = asyncio.create_task(consumer.getmany(timeout_ms=0))
    await asyncio.sleep(0.05)
    assert not poll.done()  # T1's and T2's records are not handed out while being revoked
    finish_revoking.set()
    await rebalance

    assert list(await asyncio.wait_for(poll, 1)) == [T1]


async def test_assign_since_positions_each_partition_at_its_first_record_from_then() -> None:
    kafka = three_partitions()
    since = datetime.now(UTC) + timedelta(minutes=1)
    for _ in range(2):
        kafka.append("t", b"late", partition=1, timestamp_ms=int(since.timestamp() * 1000))
    consumer = kafka.consumer()

    assigned = await assign_since(cast(AIOKafkaConsumer, consumer), ["t", "missing"], since)

    assert assigned == 3
    positions = [await consumer.position(tp) for tp in (T0, T1, T2)]
    assert positions == [3, 3, 3]  # T1 at its first late record; the others at their end
    assert await consumer.end_offsets([T1]) == {T1: 5}


async def test_failed_sends_raise_a_retriable_timeout_and_write_nothing() -> None:
    kafka = MemoryKafka()
    kafka.create_topic("t", partitions=3)
    producer = kafka.producer()
    producer.fail_next(2)

    for _ in range(2):
        with pytest.raises(KafkaTimeoutError):
            await producer.send_and_wait("t", b"lost", key=b"k")
    sent = [await producer.send_and_wait("t", b"kept", key=b"k") for _ in range(2)]

    assert [r.value for r in kafka.records("t")] == [b"kept", b"kept"]
    assert len({m.partition for m in sent}) == 1  # one key, one partition
    assert [m.offset for m in sent] == [0, 1]
