"""Exactly-once outcomes on the real broker: staged outcomes become visible to read_committed
readers only with the offsets of the requests they answer, never twice, never when aborted, and
a partition's older producer is fenced by the newer one."""

import asyncio
import gc
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from producer.follow import assign_since
from producer.publisher import DeadLetter, RecordSource
from producer.settings import KafkaSettings
from producer.transactions import TransactionalPublisher, TransactionsFailed, transactional_id
from schemas.codec import EventDecodeError
from schemas.events import CloneFailed, ErrorCode
from schemas.topics import Topics
from schemas.wire_format import make_codec

pytestmark = pytest.mark.timeout(90)

_EPOCH = datetime.fromtimestamp(0, UTC)


@pytest.fixture
def topics(worker_topics: Topics) -> Topics:
    """The worker's topics: requests with 3 partitions, the outcomes' with 1 (kept in order)."""
    return worker_topics


@pytest.fixture
def group_id() -> str:
    return f"eos-{uuid.uuid4().hex[:8]}"


def publisher_for(
    bootstrap: str, topics: Topics, group_id: str, prefix: str | None = None
) -> TransactionalPublisher:
    return TransactionalPublisher(
        KafkaSettings(bootstrap_servers=bootstrap),
        topics,
        make_codec(),
        prefix or f"txn-{uuid.uuid4().hex[:8]}",
        group_id,
    )


@pytest.fixture
async def publisher(
    kafka_bootstrap: str, topics: Topics, group_id: str
) -> AsyncIterator[TransactionalPublisher]:
    """Holding partitions 0 and 1 of the requests topic."""
    publisher = publisher_for(kafka_bootstrap, topics, group_id)
    await publisher.start()
    await publisher.open([TopicPartition(topics.requests, p) for p in (0, 1)])
    yield publisher
    await publisher.stop()


def failed(request_id: str) -> CloneFailed:
    return CloneFailed(
        request_id=request_id,
        tenant_id="tenant",
        error_code=ErrorCode.INVALID_REQUEST,
        message="test",
        retryable=False,
        attempts=1,
        failed_at=datetime.now(UTC),
    )


async def stage(publisher: TransactionalPublisher, topics: Topics, *offsets: int) -> None:
    """An outcome named `r<offset>` for each request offset of partition 0."""
    for offset in offsets:
        await publisher.publish(
            failed(f"r{offset}"), source=RecordSource(topics.requests, 0, offset)
        )


async def committed_outcomes(bootstrap: str, topics: Topics) -> list[str]:
    """Request ids of every clone-failed a read_committed subscriber sees, in order."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, isolation_level="read_committed"
    )
    await consumer.start()
    try:
        await assign_since(consumer, [topics.failed], _EPOCH)
        (tp,) = consumer.assignment()
        end = (await consumer.end_offsets([tp]))[tp]  # the last stable offset, read_committed
        codec, seen = make_codec(), []
        while await consumer.position(tp) < end:
            for records in (await consumer.getmany(timeout_ms=1000)).values():
                for record in records:
                    event = await codec.decode(record.topic, record.value, record.headers)
                    seen.append(event.request_id)
        return seen
    finally:
        await consumer.stop()


async def committed_offset(bootstrap: str, group_id: str, tp: TopicPartition) -> int | None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group_id)
    finally:
        await admin.close()
    return offsets[tp].offset if tp in offsets else None


async def test_a_commit_publishes_the_outcomes_below_its_offsets_with_them(
    kafka_bootstrap: str, topics: Topics, group_id: str, publisher: TransactionalPublisher
) -> None:
    tp = TopicPartition(topics.requests, 0)
    await stage(publisher, topics, 0, 1, 3)  # request 2 still running

    assert await publisher.commit({tp: 2}) == {tp: 2}

    assert await committed_outcomes(kafka_bootstrap, topics) == ["r0", "r1"]
    assert await committed_offset(kafka_bootstrap, group_id, tp) == 2
    assert publisher.staged == 1  # r3 waits for the gap below it

    await stage(publisher, topics, 2)
    await publisher.commit({tp: 4})

    assert await committed_outcomes(kafka_bootstrap, topics) == ["r0", "r1", "r2", "r3"]
    assert await committed_offset(kafka_bootstrap, group_id, tp) == 4
    assert publisher.staged == 0


async def test_dead_letters_go_in_the_same_transaction(
    kafka_bootstrap: str, topics: Topics, publisher: TransactionalPublisher
) -> None:
    tp = TopicPartition(topics.requests, 1)
    error = EventDecodeError("corrupt", "not Avro")
    await publisher.dead_letter(DeadLetter(topics.requests, 1, 7, b"k", b"\x00", [], error))

    await publisher.commit({tp: 8})

    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka_bootstrap, group_id=None, isolation_level="read_committed"
    )
    await consumer.start()
    try:
        await assign_since(consumer, [topics.dlq], _EPOCH)
        letter = await consumer.getone()
    finally:
        await consumer.stop()
    assert (letter.key, letter.value) == (b"k", b"\x00")
    assert ("dlq.original.offset", b"7") in letter.headers


async def test_close_drops_what_revoked_partitions_staged(
    kafka_bootstrap: str, topics: Topics, group_id: str, publisher: TransactionalPublisher
) -> None:
    tp = TopicPartition(topics.requests, 0)
    await stage(publisher, topics, 0, 1)
    await publisher.close([tp])

    assert publisher.staged == 0
    assert await publisher.commit({tp: 2}) == {}
    assert await committed_outcomes(kafka_bootstrap, topics) == []
    assert await committed_offset(kafka_bootstrap, group_id, tp) is None


async def test_an_outcome_needs_the_request_it_answers(publisher: TransactionalPublisher) -> None:
    with pytest.raises(ValueError, match="request record"):
        await publisher.publish(failed("r0"))


async def test_a_refused_record_fails_its_transaction_and_nothing_of_it_shows(
    kafka_bootstrap: str, topics: Topics, group_id: str
) -> None:
    # A failed-outcome topic that refuses records over 1,000 bytes: the broker fails the
    # transaction's produce after the good record went in with it. aiokafka's producer cannot
    # go on after a refused batch (its sequence numbers are off), so the worker must restart.
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    small = f"small-{uuid.uuid4().hex[:8]}"
    try:
        limit = {"max.message.bytes": "1000"}
        await admin.create_topics([NewTopic(small, 1, 1, topic_configs=limit)])
    finally:
        await admin.close()
    topics = topics.model_copy(update={"failed": small})
    prefix = f"txn-{uuid.uuid4().hex[:8]}"
    publisher = publisher_for(kafka_bootstrap, topics, group_id, prefix)
    await publisher.start()
    tp = TopicPartition(topics.requests, 0)
    try:
        await publisher.open([tp])
        await stage(publisher, topics, 0)
        big = failed("r1").model_copy(update={"message": "x" * 2000})
        await publisher.publish(big, source=RecordSource(topics.requests, 0, 1))

        with pytest.raises(TransactionsFailed, match=transactional_id(prefix, tp)):
            await publisher.commit({tp: 2})
    finally:
        await publisher.stop()

    assert await committed_outcomes(kafka_bootstrap, topics) == []
    assert await committed_offset(kafka_bootstrap, group_id, tp) is None
    # Restarted with the same prefix, the worker commits what it redid.
    restarted = publisher_for(kafka_bootstrap, topics, group_id, prefix)
    await restarted.start()
    try:
        await restarted.open([tp])
        await stage(restarted, topics, 0)
        await restarted.commit({tp: 1})
    finally:
        await restarted.stop()
    assert await committed_outcomes(kafka_bootstrap, topics) == ["r0"]


async def test_a_partitions_new_owner_fences_the_old_one_which_drops_its_work_and_goes_on(
    kafka_bootstrap: str, topics: Topics, group_id: str
) -> None:
    # Two workers of one group: the partition moved from `old` to `new` without `old` being
    # told (a zombie). `old`'s late commit finds itself fenced: its staged outcomes are dropped,
    # not published beside the ones `new` redid, and its other partition commits on.
    prefix = f"txn-{uuid.uuid4().hex[:8]}"
    moved, kept = TopicPartition(topics.requests, 0), TopicPartition(topics.requests, 1)
    old = publisher_for(kafka_bootstrap, topics, group_id, prefix)
    new = publisher_for(kafka_bootstrap, topics, group_id, prefix)
    await old.start()
    await new.start()
    reported: list[str] = []  # what asyncio reports as left unhandled (none: the fence is)
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: reported.append(context["message"]))
    try:
        await old.open([moved, kept])
        await stage(old, topics, 0, 1)
        await old.publish(failed("k0"), source=RecordSource(topics.requests, 1, 0))
        await new.open([moved])
        await stage(new, topics, 0, 1)
        assert await new.commit({moved: 2}) == {moved: 2}

        assert await old.commit({moved: 2, kept: 1}) == {kept: 1}

        assert old.staged == 0
        assert await old.commit({moved: 2}) == {}  # no longer ours: nothing tried
    finally:
        await new.stop()
        await old.stop()
        gc.collect()  # an unread future reports itself when collected
        loop.set_exception_handler(None)
    assert reported == []
    assert sorted(await committed_outcomes(kafka_bootstrap, topics)) == ["k0", "r0", "r1"]
    assert await committed_offset(kafka_bootstrap, group_id, moved) == 2
