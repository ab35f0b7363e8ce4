"""Backoff for aiokafka's metadata refreshes while no broker answers.

aiokafka refreshes a client's metadata in one background task, woken by every part of the client
that finds its metadata stale (a connection refused, a partition without a leader). A refresh
fails at once when no broker accepts a connection, and nothing in aiokafka waits after one: the
producer's sender, finding no leader, asks again at once. During an outage that loop ran
thousands of times a second, each round logging two errors. Here a failed refresh ends only
after a backoff that doubles with each further failure (`KafkaSettings.reconnect_backoff_*`),
so everything waiting on it is paced too; a successful one resets it.
"""

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaClient, AIOKafkaConsumer, AIOKafkaProducer

from producer.settings import KafkaSettings

MetadataUpdate = Callable[[Any, Any], Awaitable[bool]]


def pace_reconnects(owner: AIOKafkaProducer | AIOKafkaConsumer, kafka: KafkaSettings) -> None:
    """Make the client of `owner` (not started yet) back off between failed metadata refreshes."""
    client: AIOKafkaClient = owner.client if isinstance(owner, AIOKafkaProducer) else owner._client
    # aiokafka has no setting or hook for this: its one refresh routine is wrapped instead.
    client._metadata_update = _paced(client._metadata_update, kafka)  # type: ignore[method-assign]


def _paced(update: MetadataUpdate, kafka: KafkaSettings) -> MetadataUpdate:
    failures = 0

    async def paced_update(cluster_metadata: Any, topics: Any) -> bool:
        nonlocal failures
        updated = await update(cluster_metadata, topics)
        if updated:
            failures = 0
        else:
            failures += 1
            await asyncio.sleep(kafka.reconnect_backoff_seconds(failures))
        return updated

    return paced_update
