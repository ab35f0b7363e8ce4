"""`voiceclone topics create` against the real broker."""

import uuid

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from producer.admin import create_topics
from producer.kafka_clients import MAX_RECORD_BYTES
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
        assert await _max_message_bytes(admin, topics.dlq) == str(MAX_RECORD_BYTES)
        assert await _max_message_bytes(admin, topics.requests) == "1048588"  # broker default
        await admin.delete_topics(topics.all())
    finally:
        await admin.close()


async def _max_message_bytes(admin: AIOKafkaAdminClient, topic: str) -> str:
    (response,) = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    (resource,) = response.resources
    configs = {entry[0]: entry[1] for entry in resource[4]}
    return configs["max.message.bytes"]
