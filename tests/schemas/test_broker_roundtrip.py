"""Every event type produced and consumed through the real broker, in both wire formats (registry
mode on the session's real Schema Registry)."""

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from schemas.topics import Topics
from schemas.wire_format import make_codec
from tests.fixtures.kafka import TopicFactory
from tests.schemas.pairs import MODES
from tests.schemas.samples import SAMPLES

pytestmark = pytest.mark.kafka

TRACE = ("traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")


async def _fresh_topics(topic_factory: TopicFactory) -> Topics:
    names = {
        field: await topic_factory(prefix=field, partitions=1) for field in Topics.model_fields
    }
    return Topics(**names)


@pytest.mark.parametrize("mode", MODES)
async def test_every_event_survives_the_broker_with_headers(
    mode: str, kafka_bootstrap: str, topic_factory: TopicFactory, request: pytest.FixtureRequest
) -> None:
    topics = await _fresh_topics(topic_factory)
    url = request.getfixturevalue("schema_registry_url") if mode == "registry" else None
    writer, reader = make_codec(url, topics=topics), make_codec(url, topics=topics)
    sent = []
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, enable_idempotence=True)
    await producer.start()
    try:
        for field, event in SAMPLES:
            topic = getattr(topics, field)
            encoded = await writer.encode(topic, event)
            headers = [*encoded.headers, TRACE]
            await producer.send_and_wait(topic, encoded.value, headers=headers)
            sent.append((topic, event, headers))
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        *{topic for topic, _, _ in sent},
        bootstrap_servers=kafka_bootstrap,
        auto_offset_reset="earliest",
        group_id=None,
    )
    await consumer.start()
    try:
        received = []
        while len(received) < len(sent):
            batch = await consumer.getmany(timeout_ms=5000)
            assert batch, f"only {len(received)} of {len(sent)} records came back"
            received.extend(r for records in batch.values() for r in records)
    finally:
        await consumer.stop()
    by_topic: dict[str, list] = {}
    for record in sorted(received, key=lambda r: r.offset):
        by_topic.setdefault(record.topic, []).append(record)
    for topic, event, headers in sent:
        record = by_topic[topic].pop(0)
        assert list(record.headers) == headers
        assert await reader.decode(record.topic, record.value, record.headers) == event
