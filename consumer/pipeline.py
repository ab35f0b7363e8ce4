"""The stages one clone request goes through, each a small named step.

validate → fetch reference → clone (backend) → encode → store; the worker's handler decodes
before and publishes after. Every stage failure is raised as `CloneError`, so the handler has
one thing to turn into a clone-failed event.
"""

import asyncio
import hashlib
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog

from consumer.backends.base import Backend, BackendError, CloneJob, CloneResult, GenerationParams
from consumer.errors import CloneError
from consumer.reference import (
    ReferenceAudio,
    ReferenceFetcher,
    ReferenceInvalid,
    ReferenceUnavailable,
)
from consumer.settings import LimitSettings
from modal_app.audio import AudioFormat, DecodedAudio, encode_audio
from producer.storage import Storage, StorageError, StoredObject, object_key
from schemas.events import AudioReady, AudioTimings, CloneRequest, ErrorCode

log = structlog.get_logger(__name__)

_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
_EXTENSIONS = {"WAV": "wav", "FLAC": "flac", "OGG_OPUS": "ogg", "MP3": "mp3"}
_CONTENT_TYPES = {
    "WAV": "audio/wav",
    "FLAC": "audio/flac",
    "OGG_OPUS": "audio/ogg",
    "MP3": "audio/mpeg",
}


@dataclass
class StageClock:
    """Milliseconds spent per stage, logged as each stage ends."""

    request_id: str
    started: float = field(default_factory=time.perf_counter)
    ms: dict[str, int] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.ms[name] = round((time.perf_counter() - begin) * 1000)
            log.info("stage_done", request_id=self.request_id, stage=name, ms=self.ms[name])

    def total_ms(self) -> int:
        return round((time.perf_counter() - self.started) * 1000)


def validate(request: CloneRequest, limits: LimitSettings, now: datetime) -> None:
    """Reject what no backend should see: bad ids, empty or oversize text, a passed deadline."""
    for name in ("request_id", "tenant_id"):
        value = getattr(request, name)
        if not _ID.fullmatch(value) or value in {".", ".."}:
            raise CloneError(
                ErrorCode.INVALID_REQUEST, f"{name} must match [A-Za-z0-9._-]{{1,128}}"
            )
    if not request.text.strip():
        raise CloneError(ErrorCode.INVALID_REQUEST, "text is empty")
    if len(request.text) > limits.max_text_chars:
        raise CloneError(
            ErrorCode.TEXT_TOO_LONG,
            f"text has {len(request.text)} characters; the limit is {limits.max_text_chars}",
        )
    if request.deadline is not None and request.deadline <= now:
        raise CloneError(ErrorCode.EXPIRED, "the request's deadline passed before work started")


class Pipeline:
    """Turns a validated request into stored audio and the audio-ready event describing it."""

    def __init__(
        self,
        limits: LimitSettings,
        fetcher: ReferenceFetcher,
        backend: Backend,
        storage: Storage,
    ) -> None:
        self._limits = limits
        self._fetcher = fetcher
        self._backend = backend
        self._storage = storage

    async def process(self, request: CloneRequest) -> AudioReady:
        clock = StageClock(request.request_id)
        received = datetime.now(UTC)
        validate(request, self._limits, received)
        with clock.stage("reference_fetch"):
            reference = await self.fetch_reference(request)
        with clock.stage("inference"):
            result = await self.clone(request, reference)
        with clock.stage("encode"):
            audio = await self.encode(result, request.output_format.value)
        with clock.stage("upload"):
            stored = await self.store(request, audio)
        return self._audio_ready(request, result, audio, stored, clock, received)

    async def fetch_reference(self, request: CloneRequest) -> ReferenceAudio:
        voice = request.voice
        try:
            return await self._fetcher.fetch(
                voice.reference_audio_uri, voice.reference_audio_sha256
            )
        except ReferenceUnavailable as exc:
            raise CloneError(
                ErrorCode.REFERENCE_AUDIO_UNAVAILABLE, str(exc), retryable=exc.transient
            ) from exc
        except ReferenceInvalid as exc:
            raise CloneError(ErrorCode.REFERENCE_AUDIO_INVALID, str(exc)) from exc

    async def clone(self, request: CloneRequest, reference: ReferenceAudio) -> CloneResult:
        job = CloneJob(
            request_id=request.request_id,
            text=request.text,
            language=request.language.value.capitalize(),
            model=request.model.size,
            reference_audio=reference.data,
            reference_sha256=reference.sha256,
            reference_text=request.voice.reference_text,
            reference_uri=request.voice.reference_audio_uri,
            output_format=request.output_format.value,
            generation=_generation(request),
        )
        try:
            return await self._backend.clone(job, timeout=self._timeout(request))
        except BackendError as exc:
            raise CloneError(exc.code, str(exc), retryable=exc.transient) from exc

    async def encode(self, result: CloneResult, wanted: str) -> bytes:
        if result.format == wanted:
            return result.audio
        # Transcoding is CPU work: keep it off the event loop.
        return await asyncio.to_thread(transcode, result.audio, wanted)

    async def store(self, request: CloneRequest, audio: bytes) -> StoredObject:
        fmt = request.output_format.value
        key = object_key(request.tenant_id, request.request_id, _EXTENSIONS[fmt])
        try:
            return await self._storage.put(
                key,
                audio,
                _CONTENT_TYPES[fmt],
                {"request-id": request.request_id, "voice-id": request.voice.voice_id},
            )
        except StorageError as exc:
            raise CloneError(ErrorCode.STORAGE_FAILED, str(exc), retryable=exc.transient) from exc

    def _timeout(self, request: CloneRequest) -> float | None:
        """Seconds left before the request's deadline; the backend adds its own upper bound."""
        if request.deadline is None:
            return None
        left = (request.deadline - datetime.now(UTC)).total_seconds()
        if left <= 0:
            raise CloneError(ErrorCode.EXPIRED, "the request's deadline passed during processing")
        return left

    def _audio_ready(
        self,
        request: CloneRequest,
        result: CloneResult,
        audio: bytes,
        stored: StoredObject,
        clock: StageClock,
        received: datetime,
    ) -> AudioReady:
        fmt = request.output_format.value
        queue_ms = max(0, round((received - request.created_at).total_seconds() * 1000))
        return AudioReady(
            request_id=request.request_id,
            tenant_id=request.tenant_id,
            voice_id=request.voice.voice_id,
            audio_url=stored.url,
            storage_uri=stored.storage_uri,
            content_type=_CONTENT_TYPES[fmt],
            format=request.output_format,
            sample_rate=result.sample_rate,
            duration_ms=round(result.duration_seconds * 1000),
            size_bytes=len(audio),
            sha256=stored.sha256 or hashlib.sha256(audio).hexdigest(),
            model=request.model,
            backend=self._backend.name,
            language=request.language,
            cold_start=bool(result.cold_start),
            timings=AudioTimings(
                queue_ms=queue_ms,
                reference_fetch_ms=clock.ms["reference_fetch"],
                inference_ms=clock.ms["inference"],
                encode_ms=clock.ms["encode"],
                upload_ms=clock.ms["upload"],
                total_ms=clock.total_ms(),
            ),
            url_expires_at=stored.url_expires_at,
            completed_at=datetime.now(UTC),
            metadata=request.metadata,
        )


def transcode(data: bytes, wanted: str) -> bytes:
    """Re-encode audio a backend returned in another format than the request asked for."""
    audio = DecodedAudio.from_bytes(data)
    return encode_audio(audio.samples, audio.sample_rate, AudioFormat.parse(wanted))


def _generation(request: CloneRequest) -> GenerationParams:
    params = request.generation
    if params is None:
        return GenerationParams()
    return GenerationParams(**params.model_dump())
