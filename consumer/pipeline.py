"""The stages one clone request goes through, each a small named step.

validate → fetch reference → clone (backend) → encode → store; the worker's handler decodes
before and publishes after. Every stage failure is raised as `CloneError`, so the handler has
one thing to turn into a clone-failed event.
"""

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import quote

import structlog

from consumer.backends.audio import AudioFacts, read_audio_facts
from consumer.backends.base import (
    Backend,
    BackendError,
    BackendTimeout,
    CloneJob,
    CloneResult,
    GenerationParams,
)
from consumer.errors import CloneError
from consumer.metrics import Metrics, Stage
from consumer.reference import (
    ReferenceAudio,
    ReferenceFetcher,
    ReferenceInvalid,
    ReferenceUnavailable,
)
from consumer.settings import LimitSettings
from modal_app.audio import AudioFormat, DecodedAudio, encode_audio
from modal_app.errors import InvalidInput as InvalidParameter
from producer.storage import Storage, StorageError, StoredObject, object_key
from schemas.events import AudioReady, AudioTimings, CloneRequest, ErrorCode

log = structlog.get_logger(__name__)

# Storage metadata must be printable ASCII within S3's 2 KiB; caller ids are arbitrary text.
_MAX_METADATA_VALUE = 256


@dataclass
class StageClock:
    """Time spent per stage of one request: kept in milliseconds for its audio-ready event,
    logged and recorded in the metrics as each stage ends (also when it fails)."""

    request_id: str
    model: str
    metrics: Metrics
    started: float = field(default_factory=time.perf_counter)
    ms: dict[Stage, int] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: Stage) -> Iterator[None]:
        begin = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - begin
            self.ms[name] = round(seconds * 1000)
            self.metrics.observe_stage(name, self.model, seconds)
            log.info("stage_done", request_id=self.request_id, stage=name, ms=self.ms[name])

    def total_ms(self) -> int:
        return round((time.perf_counter() - self.started) * 1000)


@dataclass(frozen=True)
class EncodedAudio:
    """The bytes that will be stored, and what they hold (what the event reports)."""

    data: bytes = field(repr=False)
    facts: AudioFacts


def validate(request: CloneRequest, limits: LimitSettings, now: datetime) -> None:
    """Reject what no backend should see: empty or oversize text, a passed deadline.

    Ids need no check here: decoding validated them (`SafeId`), or the record was dead-lettered.
    """
    if not request.text.strip():
        raise CloneError(ErrorCode.INVALID_REQUEST, "text is empty")
    if len(request.text) > limits.max_text_chars:
        raise CloneError(
            ErrorCode.TEXT_TOO_LONG,
            f"text has {len(request.text)} characters; the limit is {limits.max_text_chars}",
        )
    if expired(request, now):
        raise CloneError(ErrorCode.EXPIRED, "the request's deadline passed before work started")


def expired(request: CloneRequest, now: datetime) -> bool:
    return request.deadline is not None and request.deadline <= now


class Pipeline:
    """Turns a validated request into stored audio and the audio-ready event describing it.

    `metrics` default to ones nobody exports, for callers that do not look at them.
    """

    def __init__(
        self,
        limits: LimitSettings,
        fetcher: ReferenceFetcher,
        backend: Backend,
        storage: Storage,
        metrics: Metrics | None = None,
    ) -> None:
        self._limits = limits
        self._fetcher = fetcher
        self._backend = backend
        self._storage = storage
        self._metrics = metrics if metrics is not None else Metrics.unexported()

    async def process(self, request: CloneRequest) -> AudioReady:
        clock = StageClock(request.request_id, request.model.size, self._metrics)
        received = datetime.now(UTC)
        validate(request, self._limits, received)
        with clock.stage("fetch_reference"):
            reference = await self.fetch_reference(request)
        with clock.stage("inference"):
            result = await self.clone(request, reference)
        with clock.stage("encode"):
            audio = await self.encode(result, AudioFormat(request.output_format.value))
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
        timeout = self._timeout(request)
        try:
            with self._metrics.backend_call(self._backend.name, job.model) as call:
                call.result = result = await self._backend.clone(job, timeout=timeout)
        except BackendTimeout as exc:
            if expired(request, datetime.now(UTC)):  # cut short by the caller's own deadline
                raise CloneError(
                    ErrorCode.EXPIRED, "the request's deadline passed during inference"
                ) from exc
            raise CloneError(exc.code, str(exc), retryable=exc.transient) from exc
        except BackendError as exc:
            raise CloneError(exc.code, str(exc), retryable=exc.transient) from exc
        return result

    async def encode(self, result: CloneResult, wanted: AudioFormat) -> EncodedAudio:
        """The result in the wanted format, described from the final bytes themselves."""
        try:
            data = result.audio
            if result.format != wanted.value:
                # Transcoding is CPU work: keep it off the event loop.
                data = await asyncio.to_thread(transcode, data, wanted)
            return EncodedAudio(data, read_audio_facts(data))
        except BackendError as exc:  # read_audio_facts: the bytes are not audio
            raise CloneError(exc.code, str(exc), retryable=exc.transient) from exc
        except (InvalidParameter, ValueError, RuntimeError) as exc:  # soundfile's errors
            raise CloneError(
                ErrorCode.INFERENCE_FAILED,
                f"the backend's {result.format} audio cannot be encoded as {wanted.value}: {exc}",
            ) from exc

    async def store(self, request: CloneRequest, audio: EncodedAudio) -> StoredObject:
        fmt = AudioFormat(request.output_format.value)
        key = object_key(request.tenant_id, request.request_id, fmt.extension)
        metadata = {
            "request-id": request.request_id,
            "voice-id": quote(request.voice.voice_id, safe="")[:_MAX_METADATA_VALUE],
        }
        try:
            return await self._storage.put(key, audio.data, fmt.content_type, metadata)
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
        audio: EncodedAudio,
        stored: StoredObject,
        clock: StageClock,
        received: datetime,
    ) -> AudioReady:
        queue_ms = max(0, round((received - request.created_at).total_seconds() * 1000))
        return AudioReady(
            request_id=request.request_id,
            tenant_id=request.tenant_id,
            voice_id=request.voice.voice_id,
            audio_url=stored.url,
            storage_uri=stored.storage_uri,
            content_type=AudioFormat(request.output_format.value).content_type,
            format=request.output_format,
            sample_rate=audio.facts.sample_rate,
            duration_ms=round(audio.facts.duration_seconds * 1000),
            size_bytes=stored.size_bytes,
            sha256=stored.sha256,
            model=request.model,
            backend=self._backend.name,
            language=request.language,
            cold_start=bool(result.cold_start),
            timings=AudioTimings(
                queue_ms=queue_ms,
                reference_fetch_ms=clock.ms["fetch_reference"],
                inference_ms=clock.ms["inference"],
                encode_ms=clock.ms["encode"],
                upload_ms=clock.ms["upload"],
                total_ms=clock.total_ms(),
            ),
            url_expires_at=stored.url_expires_at,
            completed_at=datetime.now(UTC),
            metadata=request.metadata,
        )


def transcode(data: bytes, wanted: AudioFormat) -> bytes:
    """Re-encode audio a backend returned in another format than the request asked for."""
    audio = DecodedAudio.from_bytes(data)
    return encode_audio(audio.samples, audio.sample_rate, wanted)


def _generation(request: CloneRequest) -> GenerationParams:
    """The request's generation parameters, checked against the engine's rules."""
    params = request.generation
    if params is None:
        return GenerationParams()
    try:
        return GenerationParams(**params.model_dump())
    except InvalidParameter as exc:
        raise CloneError(ErrorCode.INVALID_REQUEST, str(exc)) from exc
