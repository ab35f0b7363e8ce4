"""`voiceclone topics create` against the real broker."""

import uuid

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from producer.admin import create_topics
from producer.settings import ClientSettings, KafkaSettings
from schemas.topics import Topics

pytestmark = pytest.mark.kafka


async def test_creates_missing_topics_once_with_the_partitions_asked(kafka_bootstrap: str) -> None:
    run = uuid.uuid4().hex[:8]
    topics = Topics(**{field: f"admin-{run}-{field}" for field in Topics.model_fields})
    settings = ClientSettings(kafka=KafkaSettings(bootstrap_servers=kafka_bootstrap), topics=topics)

    assert sorted(await create_topics(settings, partitions=4)) == sorted(topics.all())
    assert await create_topics(settings, partitions=4) == []

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics(topics.all())
        assert {t["topic"]: len(t["partitions"]) for t in described} == dict.fromkeys(
            topics.all(), 4
        )
        await admin.delete_topics(topics.all())
    finally:
        await admin.close()
