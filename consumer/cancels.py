"""Cancellation: every worker follows the cancel topic and stops the requests it holds.

The cancel topic is read without a consumer group, so each worker sees every cancel; on start it
looks back `cancel_lookback_seconds` so a cancel sent just before a restart still counts.
Cancelled ids are remembered (bounded, with a time to live) so a cancel that arrives before its
request is fetched still wins.
"""

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Iterator
from datetime import UTC, datetime

import structlog
from aiokafka import AIOKafkaConsumer

from producer.follow import assign_since
from schemas.codec import Codec, EventDecodeError
from schemas.events import CloneCancel

log = structlog.get_logger(__name__)

RequestKey = tuple[str, str]  # (tenant_id, request_id): one tenant cannot cancel another's work


class CancelRegistry:
    """Remembers cancelled requests and signals the in-flight ones."""

    def __init__(self, ttl_seconds: float = 3600, max_entries: int = 100_000) -> None:
        self._ttl = ttl_seconds
        self._max = max_entries
        self._cancelled: OrderedDict[RequestKey, float] = OrderedDict()
        self._running: dict[RequestKey, set[asyncio.Event]] = {}

    def cancel(self, tenant_id: str, request_id: str) -> None:
        key = (tenant_id, request_id)
        self._cancelled[key] = time.monotonic() + self._ttl
        self._cancelled.move_to_end(key)
        while len(self._cancelled) > self._max:
            self._cancelled.popitem(last=False)
        for event in self._running.get(key, ()):
            event.set()

    def is_cancelled(self, tenant_id: str, request_id: str) -> bool:
        expires = self._cancelled.get((tenant_id, request_id))
        return expires is not None and expires > time.monotonic()

    @contextlib.contextmanager
    def watch(self, tenant_id: str, request_id: str) -> Iterator[asyncio.Event]:
        """An event set when this request is cancelled while the block runs."""
        key = (tenant_id, request_id)
        event = asyncio.Event()
        if self.is_cancelled(*key):
            event.set()
        self._running.setdefault(key, set()).add(event)
        try:
            yield event
        finally:
            waiting = self._running[key]
            waiting.discard(event)
            if not waiting:
                del self._running[key]


class CancelWatcher:
    """Feeds the cancel topic into a registry until stopped."""

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        topic: str,
        codec: Codec,
        registry: CancelRegistry,
        lookback_seconds: float,
    ) -> None:
        self._consumer = consumer
        self._topic = topic
        self._codec = codec
        self._registry = registry
        self._lookback = lookback_seconds

    async def run(self) -> None:
        await self._consumer.start()
        try:
            await self._seek_to_lookback()
            while True:
                batch = await self._consumer.getmany(timeout_ms=1000)
                for records in batch.values():
                    for record in records:
                        await self._apply(record.topic, record.value, record.headers)
        finally:
            await self._consumer.stop()

    async def _seek_to_lookback(self) -> None:
        since = datetime.fromtimestamp(time.time() - self._lookback, UTC)
        if not await assign_since(self._consumer, [self._topic], since):
            log.warning("cancel_topic_missing", topic=self._topic)

    async def _apply(self, topic: str, value: bytes | None, headers: list) -> None:
        try:
            event = await self._codec.decode(topic, value, headers)
        except EventDecodeError as exc:
            log.warning("cancel_undecodable", error=str(exc))
            return
        if isinstance(event, CloneCancel):
            log.info("cancel_received", request_id=event.request_id)
            self._registry.cancel(event.tenant_id, event.request_id)
