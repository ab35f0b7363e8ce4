"""Topic administration: create the product's topics on a cluster."""

import contextlib

from aiokafka.admin import NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from producer.kafka_clients import MAX_RECORD_BYTES, admin_client
from producer.settings import ClientSettings


async def create_topics(settings: ClientSettings, partitions: int | None = None) -> list[str]:
    """Create every configured topic that does not exist yet; return the names created.

    Safe to run repeatedly: topics that already exist are left as they are.
    """
    kafka = settings.kafka
    admin = admin_client(kafka)
    try:
        await admin.start()  # inside: a start that fails leaves a client to close
        existing = set(await admin.list_topics())
        wanted = [name for name in settings.topics.all() if name not in existing]
        new = [
            NewTopic(
                name=name,
                num_partitions=partitions or kafka.topic_partitions,
                replication_factor=kafka.topic_replication_factor,
                topic_configs=_configs(name, settings),
            )
            for name in wanted
        ]
        # Another process may create them between our listing and our request.
        if new:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(new)
        return wanted
    finally:
        await admin.close()


def _configs(name: str, settings: ClientSettings) -> dict[str, str]:
    """The dead-letter topic takes whole copies of request records plus their dlq.* headers."""
    if name == settings.topics.dlq:
        return {"max.message.bytes": str(MAX_RECORD_BYTES)}
    return {}
