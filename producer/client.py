"""The client library for upstream services and subscribers.

async with VoiceCloneClient(ClientSettings()) as client:
    request_id = await client.request("Hello!", reference="voice.wav", reference_text="...")
    outcome = await client.wait(request_id, timeout=600)
"""

import asyncio
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Self

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from producer.follow import assign_since
from producer.settings import ClientSettings
from producer.storage import Storage, make_storage
from schemas.codec import Codec, EventDecodeError, make_codec
from schemas.events import (
    AudioFormat,
    AudioReady,
    CloneCancel,
    CloneFailed,
    CloneRequest,
    GenerationParams,
    Language,
    ModelName,
    VoiceReference,
)

Outcome = AudioReady | CloneFailed


class VoiceCloneClient:
    """Sends clone requests and cancels, and follows their outcomes."""

    def __init__(self, settings: ClientSettings, storage: Storage | None = None) -> None:
        self._settings = settings
        self._codec: Codec = make_codec(settings.schema_registry_url)
        self._storage = storage
        self._producer = AIOKafkaProducer(
            bootstrap_servers=settings.kafka.bootstrap_servers,
            client_id=f"{settings.kafka.client_id}-client",
            acks="all",
            enable_idempotence=True,
        )

    async def __aenter__(self) -> Self:
        await self._producer.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._producer.stop()
        if self._storage is not None:
            await self._storage.close()

    async def request(
        self,
        text: str,
        reference: str | Path,
        *,
        reference_text: str | None = None,
        voice_id: str | None = None,
        tenant_id: str = "default",
        language: Language = Language.AUTO,
        model: ModelName = ModelName.QWEN3_TTS_12HZ_1_7B_BASE,
        output_format: AudioFormat = AudioFormat.WAV,
        generation: GenerationParams | None = None,
        deadline: datetime | None = None,
        metadata: Mapping[str, str] | None = None,
        request_id: str | None = None,
    ) -> str:
        """Publish a clone request; a local reference file is uploaded first. Returns its id."""
        uri, sha256 = await self._reference_uri(reference)
        event = CloneRequest(
            request_id=request_id or uuid.uuid4().hex,
            tenant_id=tenant_id,
            voice=VoiceReference(
                voice_id=voice_id or hashlib.sha256(uri.encode()).hexdigest()[:16],
                reference_audio_uri=uri,
                reference_text=reference_text,
                reference_audio_sha256=sha256,
            ),
            text=text,
            language=language,
            model=model,
            output_format=output_format,
            generation=generation,
            deadline=deadline,
            created_at=datetime.now(UTC),
            metadata=dict(metadata or {}),
        )
        await self._send(self._settings.topics.requests, event.request_id, event)
        return event.request_id

    async def cancel(self, request_id: str, tenant_id: str = "default") -> None:
        event = CloneCancel(
            request_id=request_id, tenant_id=tenant_id, requested_at=datetime.now(UTC)
        )
        await self._send(self._settings.topics.cancel, request_id, event)

    async def wait(self, request_id: str, since: datetime | None = None) -> Outcome:
        """The first outcome for `request_id` (bound it with `asyncio.timeout`)."""
        async for outcome in self.outcomes(request_id=request_id, since=since):
            return outcome
        raise AssertionError("outcomes() never ends")  # pragma: no cover

    async def outcomes(
        self, request_id: str | None = None, since: datetime | None = None
    ) -> AsyncIterator[Outcome]:
        """Follow audio-ready and clone-failed events, from `since` (default: an hour ago)."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._settings.kafka.bootstrap_servers,
            client_id=f"{self._settings.kafka.client_id}-watch",
            group_id=None,
            isolation_level="read_committed",
        )
        await consumer.start()
        try:
            topics = [self._settings.topics.audio_ready, self._settings.topics.failed]
            await assign_since(consumer, topics, since or _an_hour_ago())
            async for record in consumer:
                try:
                    event = await self._codec.decode(record.topic, record.value, record.headers)
                except EventDecodeError:
                    continue  # not ours to judge: the worker's DLQ is for requests
                if isinstance(event, Outcome) and request_id in (None, event.request_id):
                    yield event
        finally:
            await consumer.stop()

    async def _send(self, topic: str, key: str, event: CloneRequest | CloneCancel) -> None:
        encoded = await self._codec.encode(topic, event)
        await self._producer.send_and_wait(
            topic, encoded.value, key=key.encode(), headers=list(encoded.headers)
        )

    async def _reference_uri(self, reference: str | Path) -> tuple[str, str | None]:
        if isinstance(reference, str) and "://" in reference:
            return reference, None
        data = await asyncio.to_thread(Path(reference).read_bytes)
        sha256 = hashlib.sha256(data).hexdigest()
        if self._storage is None:
            self._storage = make_storage(self._settings.storage)
            await self._storage.start()
        key = f"references/{sha256}{Path(reference).suffix.lower()}"
        stored = await self._storage.put(key, data, "application/octet-stream", {})
        return stored.storage_uri, sha256


def _an_hour_ago() -> datetime:
    return datetime.fromtimestamp(time.time() - 3600, UTC)
