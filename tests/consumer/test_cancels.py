"""Cancellation: the registry's rules, and the watcher against the real broker."""

import asyncio
import functools
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from consumer.handler import CancelRegistry, CancelWatcher
from schemas.events import CloneCancel
from schemas.wire_format import make_codec
from tests.fixtures.kafka import TopicFactory

HOUR_S = 3600


def test_a_cancel_before_the_request_starts_is_seen_when_it_does() -> None:
    registry = CancelRegistry()
    registry.cancel("tenant", "r1")

    with registry.watch("tenant", "r1") as cancelled:
        assert cancelled.is_set()


def test_a_cancel_while_running_signals_every_watcher_of_that_request_only() -> None:
    registry = CancelRegistry()
    with (
        registry.watch("tenant", "r1") as first,
        registry.watch("tenant", "r1") as second,
        registry.watch("tenant", "r2") as other_request,
        registry.watch("other-tenant", "r1") as other_tenant,
    ):
        assert not first.is_set()
        registry.cancel("tenant", "r1")

        assert first.is_set()
        assert second.is_set()
        assert not other_request.is_set()
        assert not other_tenant.is_set()


def test_cancels_are_forgotten_after_their_time_to_live_and_beyond_the_bound() -> None:
    expired = CancelRegistry(ttl_seconds=0)
    expired.cancel("tenant", "r1")
    assert not expired.is_cancelled("tenant", "r1")

    bounded = CancelRegistry(max_entries=2)
    for request_id in ("r1", "r2", "r3"):
        bounded.cancel("tenant", request_id)
    assert [bounded.is_cancelled("tenant", r) for r in ("r1", "r2", "r3")] == [False, True, True]
    assert len(bounded) == 2


class CancelSender:
    def __init__(self, producer: AIOKafkaProducer, topic: str) -> None:
        self._producer = producer
        self._topic = topic

    async def cancel(self, request_id: str, *, age_s: float = 0.0) -> None:
        """A cancel for ("tenant", request_id) stamped `age_s` seconds in the past."""
        event = CloneCancel(
            request_id=request_id, tenant_id="tenant", requested_at=datetime.now(UTC)
        )
        encoded = await make_codec().encode(self._topic, event)
        await self._producer.send_and_wait(
            self._topic,
            encoded.value,
            headers=encoded.headers,
            timestamp_ms=int((time.time() - age_s) * 1000),
        )

    async def garbage(self) -> None:
        await self._producer.send_and_wait(self._topic, os.urandom(32))


@pytest.fixture
async def producer(kafka_bootstrap: str) -> AsyncIterator[AIOKafkaProducer]:
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    yield producer
    await producer.stop()


def consumer_factory(bootstrap: str) -> Callable[[], AIOKafkaConsumer]:
    return functools.partial(AIOKafkaConsumer, bootstrap_servers=bootstrap, group_id=None)


async def wait_cancelled(registry: CancelRegistry, request_id: str, within_s: float = 15) -> None:
    with registry.watch("tenant", request_id) as cancelled:
        await asyncio.wait_for(cancelled.wait(), within_s)


async def test_start_reads_the_lookback_window_then_the_watcher_follows_new_cancels(
    kafka_bootstrap: str, topic_factory: TopicFactory, producer: AIOKafkaProducer
) -> None:
    topic = await topic_factory("cancel", partitions=2)
    sender = CancelSender(producer, topic)
    await sender.cancel("too-old", age_s=2 * HOUR_S)
    await sender.garbage()  # skipped, not fatal
    for index in range(20):
        await sender.cancel(f"recent-{index}")
    registry = CancelRegistry(ttl_seconds=HOUR_S)
    watcher = CancelWatcher(
        consumer_factory(kafka_bootstrap), topic, make_codec(), registry, HOUR_S
    )

    await watcher.start()
    try:
        # Known as soon as start returns: no request can slip past its cancel.
        assert all(registry.is_cancelled("tenant", f"recent-{i}") for i in range(20))
        assert not registry.is_cancelled("tenant", "too-old")

        await sender.cancel("later")
        await wait_cancelled(registry, "later")
    finally:
        await watcher.stop()
        await watcher.stop()  # twice is fine


async def test_a_cancel_topic_created_after_start_is_picked_up(
    kafka_bootstrap: str, producer: AIOKafkaProducer
) -> None:
    topic = f"cancel-late-{uuid.uuid4().hex[:12]}"
    registry = CancelRegistry()
    watcher = CancelWatcher(
        consumer_factory(kafka_bootstrap),
        topic,
        make_codec(),
        registry,
        HOUR_S,
        retry_seconds=0.2,
    )
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    await watcher.start()  # the topic is missing: it starts anyway and looks again later
    try:
        await admin.create_topics([NewTopic(topic, 1, 1)])
        await CancelSender(producer, topic).cancel("r1")
        await wait_cancelled(registry, "r1")
    finally:
        await watcher.stop()
        await admin.delete_topics([topic])
        await admin.close()
