"""Publishing outcomes: audio-ready and clone-failed events, and dead letters.

`OutcomePublisher` is the publisher of `at_least_once`: one idempotent producer (acks=all) per
process (`OutcomeSink` encodes and routes; `exactly_once`'s publisher is in transactions.py).
`publish` returns only once the broker has
acknowledged the record, so the caller may then mark the request's offset done. Outages (of
the broker or the schema registry) are retried for as long as they last; what is raised is a
record that can never be sent (too large, invalid), for the caller to dead-letter. A record not
acknowledged within `ack_timeout_seconds` counts as retried: aiokafka keeps trying it meanwhile
and, its producer being idempotent, never gives up on one it has sent, so without this bound an
outage would go unnoticed (and unreported) for as long as it lasts.

The publisher reports retries through `PublisherHooks`, so its owner can count them without this
package knowing how, and keeps whether it can reach the broker in `connected`, for its owner's
readiness probe to read when asked.
"""

import asyncio
import functools
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, KafkaTimeoutError

from producer.kafka_clients import outcome_producer
from producer.retry import BROKER_OUTAGE, SCHEMA_REGISTRY_OUTAGE, codec_outage, retry_while
from producer.settings import KafkaSettings
from schemas.codec import Codec
from schemas.events import AudioReady, CloneFailed
from schemas.topics import Topics

log = structlog.get_logger(__name__)

# Kafka header values may be null (a dead letter copies its request's headers as they came).
Headers = Sequence[tuple[str, bytes | None]]


def _ignore(_: object) -> None:
    """The default hook: nobody listens."""


@dataclass(frozen=True)
class PublisherHooks:
    """What the publisher tells its owner as it happens."""

    # A send or an encoding failed and is retried; the reason is BROKER_OUTAGE or
    # SCHEMA_REGISTRY_OUTAGE.
    retried: Callable[[str], None] = _ignore


@dataclass(frozen=True, slots=True)
class RecordSource:
    """The input record an outcome or dead letter answers: where it was read."""

    topic: str
    partition: int
    offset: int


@dataclass(frozen=True)
class DeadLetter:
    """An input record that could not be handled, kept byte for byte with why it failed."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers
    error: BaseException
    attempts: int = 1

    @property
    def source(self) -> RecordSource:
        return RecordSource(self.topic, self.partition, self.offset)

    def error_headers(self) -> list[tuple[str, bytes]]:
        # Codec errors carry a short machine reason (`corrupt`, `unknown_schema`, ...).
        reason = getattr(self.error, "reason", None)
        return [
            ("dlq.error.type", type(self.error).__name__.encode()),
            *([("dlq.error.reason", str(reason).encode())] if reason is not None else []),
            ("dlq.error.message", str(self.error)[:1000].encode()),
            ("dlq.original.topic", self.topic.encode()),
            ("dlq.original.partition", str(self.partition).encode()),
            ("dlq.original.offset", str(self.offset).encode()),
            ("dlq.attempts", str(self.attempts).encode()),
            ("dlq.timestamp", str(int(time.time() * 1000)).encode()),
        ]


async def enqueue(
    producer: AIOKafkaProducer,
    topic: str,
    key: bytes | None,
    value: bytes | None,
    headers: Headers,
) -> asyncio.Future[object]:
    """Hand one record to `producer`; the returned future resolves on its ack."""
    if key is not None or value is not None:
        return await producer.send(topic, value, key=key, headers=headers)
    # Kafka allows a record with neither key nor value (a dead letter may copy one), but
    # aiokafka's send() refuses it: send it as a batch of one, on any partition (there is
    # no key to choose one by).
    partitions = sorted(await producer.partitions_for(topic))
    batch = producer.create_batch()
    batch.append(key=None, value=None, timestamp=None, headers=headers)
    batch.close()
    return await producer.send_batch(batch, topic, partition=random.choice(partitions))


class OutcomeSink:
    """Encodes outcome events and dead letters for their topics and hands them to `_deliver`:
    what the publisher of each processing guarantee shares."""

    def __init__(
        self,
        topics: Topics,
        codec: Codec,
        retry_backoff_seconds: float = 0.5,
        hooks: PublisherHooks | None = None,
    ) -> None:
        self._topics = topics
        self._codec = codec
        self._backoff = retry_backoff_seconds
        self._hooks = hooks if hooks is not None else PublisherHooks()
        # True once started and again after a send succeeds; False while sends fail with a
        # broker outage or wait longer than the acknowledgement timeout for the broker, and
        # from stop() on.
        self.connected = False

    async def start(self) -> None:
        self.connected = True

    async def stop(self) -> None:
        self.connected = False

    async def publish(
        self,
        event: AudioReady | CloneFailed,
        headers: Headers = (),
        source: RecordSource | None = None,
    ) -> None:
        """Send `event`, answering the request read at `source` (needed by transactions)."""
        topic = self._topics.audio_ready if isinstance(event, AudioReady) else self._topics.failed
        encoded = await retry_while(
            codec_outage,
            lambda: self._codec.encode(topic, event),
            backoff_seconds=self._backoff,
            what=f"encoding for {topic}",
            on_retry=functools.partial(self._hooks.retried, SCHEMA_REGISTRY_OUTAGE),
        )
        key = event.request_id.encode()
        await self._deliver(source, topic, key, encoded.value, [*encoded.headers, *headers])

    async def dead_letter(self, letter: DeadLetter) -> None:
        headers = [*letter.headers, *letter.error_headers()]
        await self._deliver(letter.source, self._topics.dlq, letter.key, letter.value, headers)

    async def _deliver(
        self,
        source: RecordSource | None,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: Headers,
    ) -> None:
        raise NotImplementedError


class OutcomePublisher(OutcomeSink):
    """Sends outcome events and dead letters, retrying broker errors until acknowledged.

    `producer` is the one to send with (not started: `start` starts it); by default the
    worker's outcome producer (`producer.kafka_clients`) for `kafka`.
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        topics: Topics,
        codec: Codec,
        retry_backoff_seconds: float = 0.5,
        hooks: PublisherHooks | None = None,
        ack_timeout_seconds: float = 10.0,
        producer: AIOKafkaProducer | None = None,
    ) -> None:
        super().__init__(topics, codec, retry_backoff_seconds, hooks)
        self._ack_timeout = ack_timeout_seconds
        self._producer = producer if producer is not None else outcome_producer(kafka)

    async def start(self) -> None:
        await self._producer.start()
        await super().start()

    async def stop(self) -> None:
        """Flush and close; safe to call twice, and after a failed start (closes the client)."""
        await super().stop()
        await self._producer.stop()

    async def _deliver(
        self,
        source: RecordSource | None,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: Headers,
    ) -> None:
        """At least once: each record is sent on its own and acknowledged before we return."""
        await self._send(topic, key, value, headers)

    async def _send(
        self, topic: str, key: bytes | None, value: bytes | None, headers: Headers
    ) -> None:
        # The producer already retries within its delivery timeout; past that we keep trying,
        # since marking the offset done without an acknowledged outcome would lose the request.
        delivery = _Delivery(lambda: enqueue(self._producer, topic, key, value, list(headers)))
        await retry_while(
            is_broker_outage,
            lambda: delivery.attempt(self._ack_timeout),
            backoff_seconds=self._backoff,
            what=f"sending to {topic}",
            on_retry=self._broker_unreachable,
        )
        self.connected = True

    def _broker_unreachable(self) -> None:
        self.connected = False
        self._hooks.retried(BROKER_OUTAGE)


class _Delivery:
    """One record until the broker acknowledges it; handed to the producer again only once the
    producer has given up on it, so waiting longer for it never sends it twice."""

    def __init__(self, enqueue: Callable[[], Awaitable[asyncio.Future[object]]]) -> None:
        self._enqueue = enqueue
        self._ack: asyncio.Future[object] | None = None

    async def attempt(self, timeout_seconds: float) -> None:
        """Wait up to `timeout_seconds` for the acknowledgement (KafkaTimeoutError after)."""
        try:
            async with asyncio.timeout(timeout_seconds):
                if self._ack is None or _given_up(self._ack):
                    self._ack = await self._enqueue()
                # Shielded: a timeout leaves the record with the producer, which retries it.
                await asyncio.shield(self._ack)
        except TimeoutError:
            raise KafkaTimeoutError(f"not acknowledged within {timeout_seconds:g} s") from None


def _given_up(ack: asyncio.Future[object]) -> bool:
    return ack.done() and (ack.cancelled() or ack.exception() is not None)


def is_broker_outage(exc: Exception) -> bool:
    """An error that may pass; a record too large or a closed producer never will."""
    # A delivery timeout is not flagged retriable, but it is an outage, not a bad record.
    return isinstance(exc, KafkaError) and (exc.retriable or isinstance(exc, KafkaTimeoutError))
