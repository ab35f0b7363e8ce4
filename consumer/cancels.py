"""Cancellation: every worker follows the cancel topic and stops the requests it holds.

The cancel topic is read without a consumer group, so each worker sees every cancel; on start it
reads back `cancel_lookback_seconds` to the topic's end before the worker takes any request, so
a cancel sent just before a restart still counts. Cancelled ids are remembered (bounded, with a
time to live) so a cancel that arrives before its request is fetched still wins.
"""

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition

from producer.follow import assign_since
from schemas.codec import Codec, EventDecodeError
from schemas.events import CloneCancel
from schemas.vocabulary import ErrorCode, VoicecloneError

log = structlog.get_logger(__name__)


class Cancelled(VoicecloneError):
    """A clone-cancel event named the request before its audio was ready."""

    code = ErrorCode.CANCELLED

    def __init__(self) -> None:
        super().__init__("cancelled by a clone-cancel event")


RequestKey = tuple[str, str]  # (tenant_id, request_id): one tenant cannot cancel another's work


class CancelRegistry:
    """Remembers cancelled requests and signals the in-flight ones."""

    def __init__(self, ttl_seconds: float = 3600, max_entries: int = 100_000) -> None:
        self._ttl = ttl_seconds
        self._max = max_entries
        self._cancelled: OrderedDict[RequestKey, float] = OrderedDict()
        # Called when a running request is cancelled: its event's `set`, and what stops it.
        self._running: dict[RequestKey, list[Callable[[], object]]] = {}

    def __len__(self) -> int:
        """Cancels remembered (expired ones included until evicted)."""
        return len(self._cancelled)

    def cancel(self, tenant_id: str, request_id: str) -> None:
        key = (tenant_id, request_id)
        self._cancelled[key] = time.monotonic() + self._ttl
        self._cancelled.move_to_end(key)
        while len(self._cancelled) > self._max:
            self._cancelled.popitem(last=False)
        for callback in list(self._running.get(key, ())):
            callback()

    def is_cancelled(self, tenant_id: str, request_id: str) -> bool:
        expires = self._cancelled.get((tenant_id, request_id))
        return expires is not None and expires > time.monotonic()

    @contextlib.contextmanager
    def watch(
        self, tenant_id: str, request_id: str, on_cancel: Callable[[], object] | None = None
    ) -> Iterator[asyncio.Event]:
        """An event set when this request is cancelled while the block runs (at once if it
        already was); `on_cancel` is called then too, so the caller can stop its work directly
        rather than keep a task waiting on the event (bench/)."""
        key = (tenant_id, request_id)
        event = asyncio.Event()
        callbacks = [event.set, *([on_cancel] if on_cancel is not None else [])]
        running = self._running.setdefault(key, [])
        running.extend(callbacks)
        try:
            if self.is_cancelled(*key):
                for callback in callbacks:
                    callback()
            yield event
        finally:
            for callback in callbacks:
                running.remove(callback)
            if not running:
                del self._running[key]


class CancelWatcher:
    """Feeds the cancel topic into a registry: `start` catches up, then a task follows it.

    A failure while following (a broker or registry outage) is logged and the topic reopened
    after a pause, reading the lookback window again; a failure in `start` is raised, so a
    worker that cannot see cancels does not start.
    """

    def __init__(
        self,
        make_consumer: Callable[[], AIOKafkaConsumer],
        topic: str,
        codec: Codec,
        registry: CancelRegistry,
        lookback_seconds: float,
        retry_seconds: float = 5.0,
        poll_timeout_ms: int = 1000,
    ) -> None:
        self._make_consumer = make_consumer
        self._topic = topic
        self._codec = codec
        self._registry = registry
        self._lookback = lookback_seconds
        self._retry_seconds = retry_seconds
        self._poll_timeout_ms = poll_timeout_ms
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Apply every cancel of the lookback window, then follow the topic in the background."""
        if self._task is None:
            consumer = await self._open()
            self._task = asyncio.create_task(self._follow(consumer), name="cancel-watcher")

    async def stop(self) -> None:
        """Stop following; safe to call twice."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _follow(self, consumer: AIOKafkaConsumer | None) -> None:
        while True:
            try:
                consumer = consumer or await self._open()
                while consumer.assignment():  # none: the topic was missing; look again later
                    await self._poll(consumer)
            except Exception:
                log.exception("cancel_watcher_failed")
            finally:
                if consumer is not None:
                    await consumer.stop()
                    consumer = None
            await asyncio.sleep(self._retry_seconds)

    async def _open(self) -> AIOKafkaConsumer:
        """A consumer of the cancel topic whose lookback window has been applied."""
        consumer = self._make_consumer()
        await consumer.start()
        try:
            since = datetime.fromtimestamp(time.time() - self._lookback, UTC)
            if await assign_since(consumer, [self._topic], since):
                await self._read_to_end(consumer)
            else:
                log.warning("cancel_topic_missing", topic=self._topic)
        except BaseException:
            await consumer.stop()
            raise
        return consumer

    async def _read_to_end(self, consumer: AIOKafkaConsumer) -> None:
        ends = await consumer.end_offsets(list(consumer.assignment()))
        while await _behind(consumer, ends):
            await self._poll(consumer)
        log.info("cancels_caught_up", remembered=len(self._registry))

    async def _poll(self, consumer: AIOKafkaConsumer) -> None:
        batch = await consumer.getmany(timeout_ms=self._poll_timeout_ms)
        for records in batch.values():
            for record in records:
                await self._apply(record.topic, record.value, record.headers)

    async def _apply(
        self, topic: str, value: bytes | None, headers: Sequence[tuple[str, bytes]]
    ) -> None:
        try:
            event = await self._codec.decode(topic, value, headers)
        except EventDecodeError as exc:
            if exc.transient:  # a registry outage: reopening later reads this cancel again
                raise
            log.warning("cancel_undecodable", reason=exc.reason)
            return
        if isinstance(event, CloneCancel):
            log.info("cancel_received", request_id=event.request_id)
            self._registry.cancel(event.tenant_id, event.request_id)


async def _behind(consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int]) -> bool:
    """Whether some partition's position is still short of the end offset taken at start."""
    for tp, end in ends.items():
        if await consumer.position(tp) < end:
            return True
    return False
