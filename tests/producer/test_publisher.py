"""Dead letters on the real broker: the original record, byte for byte, with why it failed.
Sends the broker fails, on Kafka in memory: retried until acknowledged, and reported."""

import time
from datetime import UTC, datetime
from typing import cast

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord

from producer.follow import assign_since
from producer.publisher import DeadLetter, OutcomePublisher, PublisherHooks
from producer.retry import BROKER_OUTAGE
from producer.settings import KafkaSettings
from schemas.codec import EventDecodeError
from schemas.topics import Topics
from schemas.wire_format import make_codec
from tests.fixtures.kafka import TopicFactory
from tests.fixtures.memory_kafka import MemoryKafka
from tests.schemas.samples import full_audio_ready

pytestmark = pytest.mark.timeout(60)


async def dead_letter_round_trip(
    bootstrap: str, topic_factory: TopicFactory, letter: DeadLetter
) -> ConsumerRecord:
    topics = Topics(dlq=await topic_factory("dlq", partitions=2))
    publisher = OutcomePublisher(KafkaSettings(bootstrap_servers=bootstrap), topics, make_codec())
    await publisher.start()
    try:
        await publisher.dead_letter(letter)
    finally:
        await publisher.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await consumer.start()
    try:
        await assign_since(consumer, [topics.dlq], datetime.fromtimestamp(0, UTC))
        return await consumer.getone()
    finally:
        await consumer.stop()


@pytest.mark.parametrize(
    ("key", "value"), [(b"k", b"\x00bytes"), (None, b"v"), (b"k", None), (None, None)]
)
async def test_a_dead_letter_keeps_the_record_and_says_why(
    kafka_bootstrap: str,
    topic_factory: TopicFactory,
    key: bytes | None,
    value: bytes | None,
) -> None:
    error = EventDecodeError("corrupt", "not Avro")
    original = [("traceparent", b"00-abc-def-01"), ("dup", b"1"), ("dup", b"2")]
    letter = DeadLetter("requests", 2, 41, key, value, original, error, attempts=1)
    before_ms = int(time.time() * 1000)

    record = await dead_letter_round_trip(kafka_bootstrap, topic_factory, letter)

    assert (record.key, record.value) == (key, value)
    assert list(record.headers[:3]) == original
    added = {name: raw.decode() for name, raw in record.headers[3:]}
    assert added == {
        "dlq.error.type": "EventDecodeError",
        "dlq.error.reason": "corrupt",
        "dlq.error.message": "not Avro",
        "dlq.original.topic": "requests",
        "dlq.original.partition": "2",
        "dlq.original.offset": "41",
        "dlq.attempts": "1",
        "dlq.timestamp": added["dlq.timestamp"],
    }
    assert before_ms <= int(added["dlq.timestamp"]) <= int(time.time() * 1000)


async def test_sends_the_broker_fails_are_retried_until_acknowledged_and_reported() -> None:
    kafka = MemoryKafka()
    topics = kafka.create_worker_topics()
    producer = kafka.producer()
    retried: list[tuple[str, bool]] = []  # each retry's reason, and whether connected then
    publisher = OutcomePublisher(
        KafkaSettings(),
        topics,
        make_codec(),
        retry_backoff_seconds=0.01,
        hooks=PublisherHooks(retried=lambda reason: retried.append((reason, publisher.connected))),
        producer=cast(AIOKafkaProducer, producer),
    )
    event = full_audio_ready()
    before = publisher.connected
    await publisher.start()
    started = publisher.connected
    producer.fail_next(2)

    await publisher.publish(event)
    back = publisher.connected
    await publisher.stop()

    (record,) = kafka.records(topics.audio_ready)
    assert record.key == event.request_id.encode()
    assert retried == [(BROKER_OUTAGE, False), (BROKER_OUTAGE, False)]  # down twice
    assert (before, started, back, publisher.connected) == (False, True, True, False)
    assert (producer.started, producer.stopped) == (True, True)
