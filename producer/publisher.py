"""Publishing outcomes: audio-ready and clone-failed events, and dead letters.

One idempotent producer (acks=all) per process. `publish` returns only once the broker has
acknowledged the record, so the caller may then mark the request's offset done.
"""

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from producer.settings import KafkaSettings
from schemas.codec import Codec
from schemas.events import AudioReady, CloneFailed
from schemas.topics import Topics

log = structlog.get_logger(__name__)

Headers = Sequence[tuple[str, bytes]]


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

    def error_headers(self) -> list[tuple[str, bytes]]:
        return [
            ("dlq.error.type", type(self.error).__name__.encode()),
            ("dlq.error.message", str(self.error)[:1000].encode()),
            ("dlq.original.topic", self.topic.encode()),
            ("dlq.original.partition", str(self.partition).encode()),
            ("dlq.original.offset", str(self.offset).encode()),
            ("dlq.attempts", str(self.attempts).encode()),
            ("dlq.timestamp", str(int(time.time() * 1000)).encode()),
        ]


class OutcomePublisher:
    """Sends outcome events and dead letters, retrying broker errors until acknowledged."""

    def __init__(
        self,
        kafka: KafkaSettings,
        topics: Topics,
        codec: Codec,
        retry_backoff_seconds: float = 0.5,
    ) -> None:
        self._topics = topics
        self._codec = codec
        self._backoff = retry_backoff_seconds
        self._producer = AIOKafkaProducer(
            bootstrap_servers=kafka.bootstrap_servers,
            client_id=f"{kafka.client_id}-publisher",
            acks="all",
            enable_idempotence=True,
            linger_ms=2,
        )

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def publish(self, event: AudioReady | CloneFailed, headers: Headers = ()) -> None:
        topic = self._topics.audio_ready if isinstance(event, AudioReady) else self._topics.failed
        encoded = await self._codec.encode(topic, event)
        await self._send(
            topic, event.request_id.encode(), encoded.value, [*encoded.headers, *headers]
        )

    async def dead_letter(self, letter: DeadLetter) -> None:
        headers = [*letter.headers, *letter.error_headers()]
        await self._send(self._topics.dlq, letter.key, letter.value, headers)

    async def _send(
        self, topic: str, key: bytes | None, value: bytes | None, headers: Headers
    ) -> None:
        # The producer already retries within its delivery timeout; past that we keep trying,
        # since marking the offset done without an acknowledged outcome would lose the request.
        while True:
            try:
                await self._producer.send_and_wait(topic, value, key=key, headers=list(headers))
            except KafkaError as exc:
                log.warning("publish_retry", topic=topic, error=repr(exc))
                await asyncio.sleep(self._backoff)
            else:
                return
