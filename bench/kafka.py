"""The broker side of the benchmarks: fresh topics per run, loading requests, reading outputs."""

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import for_code

from schemas.topics import Topics

_LEADER_TIMEOUT_S = 30.0
_POLL_S = 0.05
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Message:
    """A record to produce: what the request producer of a benchmark sends."""

    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]


@contextlib.asynccontextmanager
async def fresh_topics(bootstrap: str, partitions: int) -> AsyncIterator[Topics]:
    """The five topics of one run, each with `partitions` partitions (as `voiceclone topics
    create --partitions N` makes them); deleted when the block ends."""
    run = uuid.uuid4().hex[:8]
    topics = Topics(**{field: f"bench-{run}-{field}" for field in Topics.model_fields})
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        response = await admin.create_topics(
            [NewTopic(name, partitions, replication_factor=1) for name in topics.all()]
        )
        # aiokafka types the answer as a bare Response; its fields are made from its schema.
        errors = response.topic_errors  # pyright: ignore[reportAttributeAccessIssue]
        for name, error_code, *message in errors:
            if error_code:
                raise for_code(error_code)(f"creating topic {name}: {message}")
        for name in topics.all():
            await _wait_for_leaders(admin, name)
        yield topics
    finally:
        with contextlib.suppress(Exception):  # best effort: a leftover topic is harmless
            await admin.delete_topics(topics.all())
        await admin.close()


async def _wait_for_leaders(admin: AIOKafkaAdminClient, topic: str) -> None:
    """CreateTopics answers before every partition has a leader; producing then would stall."""
    async with asyncio.timeout(_LEADER_TIMEOUT_S):
        while True:
            (described,) = await admin.describe_topics([topic])
            partitions = described["partitions"]
            if described["error_code"] == 0 and all(p["leader"] >= 0 for p in partitions):
                return
            await asyncio.sleep(_POLL_S)


def request_producer(bootstrap: str, linger_ms: int = 0) -> AIOKafkaProducer:
    """A producer like the client library's (acks=all, idempotent)."""
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        client_id="bench-requests",
        acks="all",
        enable_idempotence=True,
        linger_ms=linger_ms,
    )


async def preload(bootstrap: str, topic: str, messages: Sequence[Message]) -> None:
    """Produce every message and wait until all are acknowledged."""
    producer = request_producer(bootstrap, linger_ms=5)
    await producer.start()
    try:
        pending = [
            await producer.send(topic, m.value, key=m.key, headers=m.headers) for m in messages
        ]
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


class TopicReader:
    """Reads whole topics without a group: how many records they hold, and their timestamps."""

    def __init__(self, bootstrap: str) -> None:
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False
        )
        self._known: dict[str, list[TopicPartition]] = {}

    async def __aenter__(self) -> "TopicReader":
        await self._consumer.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._consumer.stop()

    async def count(self, topic: str) -> int:
        """Records in `topic` (its end offsets: no transactions, so no markers)."""
        ends = await self._consumer.end_offsets(await self._partitions(topic))
        return sum(ends.values())

    async def wait_for(self, topic: str, count: int, within_s: float) -> None:
        """Until `topic` holds `count` records; polls the end offsets, which costs the broker
        (and the worker sharing these cores) next to nothing."""
        async with asyncio.timeout(within_s):
            while True:
                if await self.count(topic) >= count:
                    return
                await asyncio.sleep(_POLL_S)

    async def timestamps(self, topic: str) -> dict[bytes, float]:
        """Each record's key and producer timestamp (CreateTime, in seconds)."""
        return {r.key or b"": r.timestamp / 1000 for r in await self.records(topic)}

    async def records(self, topic: str) -> list[ConsumerRecord]:
        """Every record in `topic` now, from its start."""
        tps = await self._partitions(topic)
        ends = await self._consumer.end_offsets(tps)
        self._consumer.assign(tps)
        await self._consumer.seek_to_beginning(*tps)
        found: list[ConsumerRecord] = []
        while await _behind(self._consumer, ends):
            batch = await self._consumer.getmany(timeout_ms=500)
            for records in batch.values():
                found.extend(records)
        return found

    async def _partitions(self, topic: str) -> list[TopicPartition]:
        if topic not in self._known:
            # As producer/follow.py does: the consumer's own metadata knows only assigned
            # topics, so read the partitions from fresh cluster metadata.
            cluster = await self._consumer._client.fetch_all_metadata()
            partitions = sorted(cluster.partitions_for_topic(topic) or ())
            self._known[topic] = [TopicPartition(topic, p) for p in partitions]
        return self._known[topic]


async def _behind(consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int]) -> bool:
    for tp, end in ends.items():
        if await consumer.position(tp) < end:
            return True
    return False


class ArrivalClock:
    """Follows topics from their start and notes when each key arrives (`time.perf_counter`).

    Reads keys only, nothing is decoded: the outcome's key is its request id.
    """

    def __init__(self, bootstrap: str, topics: Sequence[str]) -> None:
        self.arrived: dict[bytes, float] = {}
        self._topics = list(topics)
        self._consumer = AIOKafkaConsumer(
            *self._topics,
            bootstrap_servers=bootstrap,
            group_id=None,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()

    async def __aenter__(self) -> "ArrivalClock":
        await self._consumer.start()
        self._task = asyncio.create_task(self._follow(), name="arrival-clock")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._consumer.stop()

    async def wait_for(self, keys: set[bytes], within_s: float) -> None:
        async with asyncio.timeout(within_s), self._changed:
            await self._changed.wait_for(lambda: keys <= self.arrived.keys())

    async def _follow(self) -> None:
        while True:
            batch = await self._consumer.getmany(timeout_ms=1000)
            now = time.perf_counter()
            for records in batch.values():
                for record in records:
                    self.arrived.setdefault(record.key or b"", now)
            async with self._changed:
                self._changed.notify_all()


async def while_running(wait: Awaitable[T], runner: asyncio.Task[None]) -> T:
    """`await wait`, failing at once if `runner` (the worker or relay under test) ends first."""
    waiting = asyncio.ensure_future(wait)
    try:
        await asyncio.wait({waiting, runner}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not waiting.done():
            waiting.cancel()
    if runner.done() and not waiting.done():
        runner.result()  # raises its error
        raise RuntimeError(f"{runner.get_name()} stopped before the benchmark was done")
    return waiting.result()
