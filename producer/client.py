"""The client library for upstream services and subscribers.

async with VoiceCloneClient(ClientSettings()) as client:
    request_id = await client.request("Hello!", reference="voice.wav", reference_text="...")
    outcome = await client.wait(request_id, timeout=600)
    if isinstance(outcome, AudioReady):
        path = await download_audio(outcome, Path("out"))
"""

import asyncio
import contextlib
import hashlib
import mimetypes
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Final, Self
from urllib.parse import urlsplit
from urllib.request import url2pathname

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from producer.follow import assign_since
from producer.kafka_clients import client_producer, follower_consumer
from producer.settings import ClientSettings
from producer.storage import Storage, make_storage, reference_key
from schemas.codec import Codec, EventDecodeError
from schemas.events import (
    AudioFormat,
    AudioReady,
    CloneCancel,
    CloneFailed,
    CloneRequest,
    GenerationRecord,
    Language,
    ModelName,
    VoiceReference,
)
from schemas.vocabulary import DEFAULT_MODEL

Outcome = AudioReady | CloneFailed
_DOWNLOAD_TIMEOUT: Final = httpx.Timeout(60.0, connect=10.0)


class VoiceCloneClient:
    """Sends clone requests and cancels, and follows their outcomes.

    `producer` sends them (not started: entering starts it); by default the client producer
    of `producer.kafka_clients`.
    """

    def __init__(
        self,
        settings: ClientSettings,
        storage: Storage | None = None,
        producer: AIOKafkaProducer | None = None,
    ) -> None:
        self._settings = settings
        self._codec: Codec = settings.make_codec()
        self._storage = storage
        self._producer = producer if producer is not None else client_producer(settings.kafka)

    async def __aenter__(self) -> Self:
        try:
            await self._producer.start()
        except BaseException:
            await self.close()  # aiokafka leaves a producer whose start failed open
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop the producer and close the storage; what `async with` does on the way out."""
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
        model: ModelName = DEFAULT_MODEL,
        output_format: AudioFormat = AudioFormat.WAV,
        generation: GenerationRecord | None = None,
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

    # A timeout parameter rather than asyncio.timeout around the call: waiting is the whole
    # point of this method, and every caller needs a bound.
    async def wait(
        self,
        request_id: str,
        since: datetime | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Outcome:
        """The first outcome for `request_id` published at or after `since` (default: an hour
        ago). Raises TimeoutError after `timeout` seconds (None: wait forever)."""
        try:
            async with asyncio.timeout(timeout), self.follow(request_id, since) as outcomes:
                async for outcome in outcomes:
                    return outcome
        except TimeoutError:
            if timeout is None:
                raise
            raise TimeoutError(f"no outcome for {request_id} within {timeout:g} s") from None
        raise AssertionError("follow() never ends")  # pragma: no cover

    async def outcomes(
        self, request_id: str | None = None, since: datetime | None = None
    ) -> AsyncIterator[Outcome]:
        """Audio-ready and clone-failed events from `since` (default: an hour ago), for every
        request or only `request_id`; never ends by itself."""
        async with self.follow(request_id, since) as outcomes:
            async for outcome in outcomes:
                yield outcome

    @contextlib.asynccontextmanager
    async def follow(
        self, request_id: str | None = None, since: datetime | None = None
    ) -> AsyncIterator[AsyncIterator[Outcome]]:
        """Like `outcomes`, but positioned on entry: nothing published after entering is missed,
        even with `since` = now. `async with client.follow() as outcomes: async for ...`"""
        consumer = follower_consumer(self._settings.kafka)
        try:
            await consumer.start()  # inside: a start that fails leaves a consumer to stop
            topics = [self._settings.topics.audio_ready, self._settings.topics.failed]
            if not await assign_since(consumer, topics, since or _an_hour_ago()):
                raise TopicsMissing(
                    f"the outcome topics {topics} do not exist: `voiceclone topics create`"
                )
            decoded = self._decode(consumer, request_id)
            async with contextlib.aclosing(decoded):
                yield decoded
        finally:
            await consumer.stop()

    async def _decode(
        self, consumer: AIOKafkaConsumer, request_id: str | None
    ) -> AsyncGenerator[Outcome]:
        async for record in consumer:
            try:
                event = await self._codec.decode(record.topic, record.value, record.headers)
            except EventDecodeError:
                continue  # not ours to judge: the worker's DLQ is for requests
            if isinstance(event, Outcome) and request_id in (None, event.request_id):
                yield event

    async def _send(self, topic: str, key: str, event: CloneRequest | CloneCancel) -> None:
        encoded = await self._codec.encode(topic, event)
        await self._producer.send_and_wait(
            topic, encoded.value, key=key.encode(), headers=list(encoded.headers)
        )

    async def _reference_uri(self, reference: str | Path) -> tuple[str, str | None]:
        if isinstance(reference, str) and is_uri(reference):
            return reference, None
        if self._storage is None:
            self._storage = make_storage(self._settings.storage)
            await self._storage.start()
        return await upload_reference(self._storage, Path(reference))


async def upload_reference(storage: Storage, path: Path) -> tuple[str, str]:
    """Store the recording at `path` as a reference; returns its storage URI and SHA-256."""
    data = await asyncio.to_thread(path.read_bytes)
    sha256 = hashlib.sha256(data).hexdigest()
    suffix = path.suffix.lower()
    content_type = mimetypes.types_map.get(suffix, "application/octet-stream")
    # Content-addressed: uploading the same recording twice stores it once.
    stored = await storage.put(reference_key(sha256, suffix), data, content_type, {})
    return stored.storage_uri, sha256


def is_uri(reference: str) -> bool:
    """Whether a reference is a URI for the worker to read (https://, s3://, file://), not the
    path of a local file to upload."""
    return "://" in reference


class TopicsMissing(Exception):
    """The outcome topics do not exist (yet): `voiceclone topics create` makes them."""


class DownloadError(Exception):
    """The audio of an AudioReady event could not be fetched, or is not what the event says."""


async def download_audio(outcome: AudioReady, directory: Path) -> Path:
    """Save the audio of `outcome` as `directory/<request_id>.<ext>` and return the path.

    Reads `file://` URLs (local storage) from disk and fetches http(s) URLs (presigned or
    public); the bytes must match the event's sha256. The file appears whole or not at all.
    """
    url = outcome.audio_url
    scheme = urlsplit(url).scheme
    if scheme == "file":
        data = await _read_file_url(url)
    elif scheme in {"http", "https"}:
        data = await _fetch_http(url)
    else:
        raise DownloadError(f"cannot download {scheme}:// URLs: {url}")
    if hashlib.sha256(data).hexdigest() != outcome.sha256.lower():
        raise DownloadError(f"{url}: the bytes do not match the event's sha256")
    target = directory / f"{outcome.request_id}{_extension(outcome)}"
    await asyncio.to_thread(_write_atomically, target, data)
    return target


async def _read_file_url(url: str) -> bytes:
    path = Path(url2pathname(urlsplit(url).path))
    try:
        return await asyncio.to_thread(path.read_bytes)
    except OSError as exc:
        raise DownloadError(f"{url}: {exc.strerror or exc}") from exc


async def _fetch_http(url: str) -> bytes:
    # httpx's own messages quote the whole URL, a presigned URL's signature included.
    shown = _without_query(url)
    try:
        async with httpx.AsyncClient(timeout=_DOWNLOAD_TIMEOUT, follow_redirects=True) as http:
            response = await http.get(url)
            response.raise_for_status()
    except httpx.HTTPStatusError as exc:
        raise DownloadError(f"{shown}: HTTP {exc.response.status_code}") from exc
    except httpx.HTTPError as exc:
        raise DownloadError(f"{shown}: {type(exc).__name__}") from exc
    return response.content


def _extension(outcome: AudioReady) -> str:
    """The stored object's own extension (the worker names objects by format)."""
    return PurePosixPath(urlsplit(outcome.audio_url).path).suffix or f".{outcome.format.lower()}"


def _write_atomically(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    partial.write_bytes(data)
    partial.replace(target)


def _without_query(url: str) -> str:
    """A presigned URL minus its signature, fit for an error message."""
    return urlsplit(url)._replace(query="").geturl()


def _an_hour_ago() -> datetime:
    return datetime.fromtimestamp(time.time() - 3600, UTC)
