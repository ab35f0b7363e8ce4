"""The stages one clone request goes through, each a small named step.

check → wait for the tenant's turn → look for audio it already produced → fetch reference →
clone (backend) → encode → store; the worker's handler decodes before and publishes after.
Each stage raises the `VoicecloneError` of the part that failed, which knows its error code;
`Pipeline.process` raises it as the request's `CloneError`, so the handler has one thing to
turn into a clone-failed event. The request's `Deadline` is read once and bounds every stage.

A stage that fails with a transient error (reference fetch, backend call, storage) is retried
on its own, with backoff, within the retry settings and the request's deadline: a failed
backend call is tried again with the reference already fetched. Audio a request already
produced (a redelivery) is described again instead of regenerated, from the facts stored
beside it. What audio holds (format, sample rate, duration) is read from its bytes here, not
taken from the backend's word.
"""

import asyncio
import functools
import hashlib
import io
import json
import math
import struct
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final, Self, TypeVar
from urllib.parse import quote

import soundfile
import structlog

from consumer.admission import UNLIMITED, Deadline, KeyedSemaphores, TenantAdmission
from consumer.backends.base import Backend, BackendTimeout, CloneJob, CloneResult
from consumer.errors import CloneError
from consumer.reference import ReferenceAudio, ReferenceFetcher
from consumer.settings import LimitSettings, RetrySettings
from consumer.telemetry import Metrics, RetriedStage, Stage
from modal_app.audio import DecodedAudio, encode_audio
from producer.retry import retry
from producer.storage import Storage, StoredObject, object_key
from producer.storage.base import validate_id
from schemas.events import AudioReady, AudioTimings, CloneRequest
from schemas.vocabulary import (
    AudioFormat,
    ErrorCode,
    GenerationFailed,
    GenerationParams,
    InvalidInput,
    VoicecloneError,
)

log = structlog.get_logger(__name__)

T = TypeVar("T")
# What transcoding holds per sample and channel (32-bit floats): the decoded size's unit.
_DECODED_BYTES_PER_SAMPLE = 4


@dataclass
class Progress:
    """What a request's failure reports beside its error: the milliseconds each timed stage
    that ran took (the failing one last), and how many times the failing step was tried."""

    stage_ms: dict[Stage, int] = field(default_factory=dict)
    attempts: int = 1  # more only when a retried step gave up

    def failure(self, error: VoicecloneError) -> CloneError:
        return CloneError(error, attempts=self.attempts, stage_ms=self.stage_ms)


@dataclass
class StageClock:
    """Time spent per stage of one request: kept in milliseconds for its outcome (the
    audio-ready event, or its CloneError) and recorded in the metrics as each stage ends, also
    when it fails; a span per stage when the request is traced. Not logged per stage: the
    outcome's one log line says it."""

    model: str
    metrics: Metrics
    ms: dict[Stage, int]

    def stage(self, name: Stage) -> AbstractContextManager[None]:
        return self.metrics.stage(name, self.model, self.ms)


# -- what audio holds, read from its header --------------------------------------------------------

_RIFF_HEADER = struct.Struct("<4sI4s")
_CHUNK_HEADER = struct.Struct("<4sI")
_FMT = struct.Struct("<HHIIHH")  # format tag, channels, rate, byte rate, block align, bits
# Plain PCM and IEEE float WAVs, the ones libsndfile reports as "WAV" (the extensible
# format is "WAVEX"), at the sample widths it writes.
_PLAIN_WAV_BITS = {1: frozenset({8, 16, 24, 32}), 3: frozenset({32, 64})}


@dataclass(frozen=True)
class AudioFacts:
    format: str  # in the worker's vocabulary: "WAV", "FLAC", "OGG_OPUS", "MP3", ...
    sample_rate: int
    duration_seconds: float


def read_audio_facts(audio: bytes) -> AudioFacts:
    """Format, sample rate and duration of `audio`; `GenerationFailed` if it is not audio.

    Reads only the header, so it is cheap enough to run on the event loop. A plain WAV's
    header is parsed here: libsndfile would read it through Python callbacks, each of which
    gives up and takes back the GIL, and the event loop then waits behind every thread that
    wants it (profiled at a fifth of the worker's time). Anything else goes to libsndfile.
    """
    facts = _plain_wav_facts(audio)
    return facts if facts is not None else _soundfile_facts(audio)


def _soundfile_facts(audio: bytes) -> AudioFacts:
    try:
        info = soundfile.info(io.BytesIO(audio))
    except soundfile.SoundFileError as exc:
        raise GenerationFailed(
            f"the backend returned {len(audio)} bytes that are not audio"
        ) from exc
    audio_format = "OGG_OPUS" if (info.format, info.subtype) == ("OGG", "OPUS") else info.format
    return AudioFacts(audio_format, int(info.samplerate), float(info.duration))


def _plain_wav_facts(audio: bytes) -> AudioFacts | None:
    """The facts of a well-formed PCM or float RIFF/WAVE file; None for anything else
    (other formats, extensible or compressed WAVs, sizes that do not add up)."""
    if len(audio) < _RIFF_HEADER.size:
        return None
    riff, _, wave = _RIFF_HEADER.unpack_from(audio)
    if riff != b"RIFF" or wave != b"WAVE":
        return None
    fmt: tuple[int, ...] | None = None
    offset = _RIFF_HEADER.size
    while offset + _CHUNK_HEADER.size <= len(audio):
        chunk, size = _CHUNK_HEADER.unpack_from(audio, offset)
        body = offset + _CHUNK_HEADER.size
        if chunk == b"fmt " and size >= _FMT.size and body + size <= len(audio):
            fmt = _FMT.unpack_from(audio, body)
        elif chunk == b"data":
            fits = body + size <= len(audio)
            return _facts_from(fmt, size) if fits else None
        offset = body + size + (size & 1)  # chunks are padded to an even length
    return None


def _facts_from(fmt: tuple[int, ...] | None, data_bytes: int) -> AudioFacts | None:
    if fmt is None:
        return None
    tag, channels, rate, _, block_align, bits = fmt
    plain = bits in _PLAIN_WAV_BITS.get(tag, ()) and channels > 0 and rate > 0
    if not plain or block_align != channels * bits // 8 or data_bytes % block_align:
        return None
    return AudioFacts("WAV", rate, data_bytes // block_align / rate)


# -- audio a request already produced --------------------------------------------------------------
# A request's object key is fixed by its tenant and request ids. Next to the audio the worker
# stores a fingerprint of everything in the request that shapes the audio, plus the facts its
# audio-ready event reports (sample rate, duration, backend), so the event can be rebuilt from a
# `head` of the object without downloading it. The same ids with other content (a reused
# request id) have another fingerprint: that audio is regenerated and overwritten.

# Object metadata names (S3 user metadata rules: lower case, printable ASCII values).
FINGERPRINT: Final = "request-fingerprint"
SAMPLE_RATE: Final = "sample-rate"
DURATION_MS: Final = "duration-ms"
BACKEND: Final = "backend"
# Versioned, so a change of what is hashed regenerates rather than matching by accident.
_FINGERPRINT_VERSION: Final = "v1"
# Caller ids are arbitrary text; metadata must stay well within S3's 2 KiB.
_MAX_METADATA_VALUE: Final = 256


@dataclass(frozen=True)
class StoredFacts:
    """What an audio-ready event says about audio beyond its bytes."""

    sample_rate: int
    duration_ms: int
    backend: str


def request_fingerprint(request: CloneRequest) -> str:
    """A digest of the request's content: text, voice, language, model, format, generation."""
    voice = request.voice
    generation = request.generation
    content = {
        "text": request.text,
        "voice_uri": voice.reference_audio_uri,
        "voice_sha256": voice.reference_audio_sha256,
        "voice_text": voice.reference_text,
        "language": request.language.value,
        "model": request.model.value,
        "format": request.output_format.value,
        "generation": None if generation is None else generation.model_dump(),
    }
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    digest = hashlib.sha256(canonical.encode("ascii")).hexdigest()
    return f"{_FINGERPRINT_VERSION}-{digest}"


def object_metadata(request: CloneRequest, fingerprint: str, facts: StoredFacts) -> dict[str, str]:
    """The metadata stored with a request's audio."""
    return {
        "request-id": request.request_id,
        "voice-id": quote(request.voice.voice_id, safe="")[:_MAX_METADATA_VALUE],
        FINGERPRINT: fingerprint,
        SAMPLE_RATE: str(facts.sample_rate),
        DURATION_MS: str(facts.duration_ms),
        BACKEND: facts.backend,  # a backend's name: "modal", "http", "local"
    }


def reusable_facts(metadata: Mapping[str, str], fingerprint: str) -> StoredFacts | None:
    """The facts stored with audio made for the content `fingerprint` names; None when the
    object's metadata is another request's, or not ours (then the audio is regenerated)."""
    if metadata.get(FINGERPRINT) != fingerprint:
        return None
    try:
        sample_rate, duration_ms = int(metadata[SAMPLE_RATE]), int(metadata[DURATION_MS])
    except (KeyError, ValueError):
        return None
    if sample_rate <= 0 or duration_ms < 0:
        return None
    return StoredFacts(sample_rate, duration_ms, metadata.get(BACKEND, "unknown"))


# -- the stages ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedAudio:
    """Audio bytes, and what they hold as read from them: the backend's, then the bytes that
    will be stored (what the event reports)."""

    data: bytes = field(repr=False)
    facts: AudioFacts

    @classmethod
    def read(cls, data: bytes) -> Self:
        """`data` and its facts; `GenerationFailed` if it is not audio."""
        return cls(data, read_audio_facts(data))


def check_request(request: CloneRequest, limits: LimitSettings) -> None:
    """Reject what no backend should see: ids unfit for a storage key, empty or oversize text.

    Ids are checked here rather than when the event is decoded, so that a request naming
    `../x` is answered with INVALID_REQUEST (`InvalidKeyError`); no key is built from it.
    """
    validate_id(request.tenant_id, "tenant_id")
    validate_id(request.request_id, "request_id")
    if not request.text.strip():
        raise InvalidInput("text is empty")
    if len(request.text) > limits.max_text_chars:
        raise InvalidInput(
            f"text has {len(request.text)} characters; the limit is {limits.max_text_chars}",
            code=ErrorCode.TEXT_TOO_LONG,
        )


def check_audio_size(audio: bytes, facts: AudioFacts, limit: int) -> None:
    """Refuse audio larger than `limit` bytes as sent or once decoded (a few compressed bytes
    can decode to gigabytes), before it is transcoded or stored."""
    decoded = math.ceil(facts.duration_seconds * facts.sample_rate) * _DECODED_BYTES_PER_SAMPLE
    if max(len(audio), decoded) > limit:
        raise GenerationFailed(
            f"the backend returned {facts.duration_seconds:.1f} s of audio at "
            f"{facts.sample_rate} Hz, {len(audio)} bytes as sent and {decoded} bytes decoded; "
            f"the limit is {limit}"
        )


@dataclass(frozen=True)
class Output:
    """The stored audio a request produced (now or on an earlier delivery), as its event
    describes it."""

    stored: StoredObject
    facts: StoredFacts
    cold_start: bool


class Pipeline:
    """Turns a request into stored audio and the audio-ready event describing it.

    Also what bounds the work: one request per object key at a time (a duplicate waits, then
    finds the audio), and within the tenant admission the caller gives (`consumer.admission`).
    `metrics` default to ones nobody exports, for callers that do not look at them.
    """

    def __init__(
        self,
        limits: LimitSettings,
        fetcher: ReferenceFetcher,
        backend: Backend,
        storage: Storage,
        metrics: Metrics | None = None,
        retry: RetrySettings | None = None,
    ) -> None:
        self._limits = limits
        self._fetcher = fetcher
        self._backend = backend
        self._storage = storage
        self._metrics = metrics if metrics is not None else Metrics.unexported()
        self._retry = (retry if retry is not None else RetrySettings()).policy()
        self._objects = KeyedSemaphores(1)

    async def process(
        self, request: CloneRequest, admission: TenantAdmission = UNLIMITED
    ) -> AudioReady:
        """The request's audio, stored, and the event describing it, made once `admission` (the
        consume loop's) gives its tenant a turn; raises `CloneError`."""
        progress = Progress()
        try:
            check_request(request, self._limits)
            deadline = Deadline.of(request.deadline)
            key = object_key(request.tenant_id, request.request_id, request.output_format.extension)
            async with (
                admission.turn(request.tenant_id, deadline.remaining()),
                self._objects.hold(key),
            ):
                return await self._produce(request, key, deadline, progress)
        except VoicecloneError as exc:
            # The one place a failure becomes the request's: its code is the error's own.
            raise progress.failure(exc) from exc

    async def _produce(
        self, request: CloneRequest, key: str, deadline: Deadline, progress: Progress
    ) -> AudioReady:
        clock = StageClock(request.model.size, self._metrics, progress.stage_ms)
        received = datetime.now(UTC)
        fingerprint = request_fingerprint(request)
        retried = functools.partial(self._retried, request.request_id, deadline, progress)
        existing = await retried("storage", lambda: self.find_existing(key, fingerprint))
        if existing is not None:  # before the deadline check: the outcome already exists
            log.info("audio_reused", request_id=request.request_id, key=key)
            return self._audio_ready(request, existing, clock, received)
        deadline.check()
        with clock.stage("fetch_reference"):
            reference = await retried("reference", lambda: self.fetch_reference(request))
        with clock.stage("inference"):
            result, generated = await retried(
                "backend", lambda: self.clone(request, reference, deadline)
            )
        with clock.stage("encode"):
            audio = await self.encode(generated, request.output_format)
        seconds = audio.facts.duration_seconds
        facts = StoredFacts(audio.facts.sample_rate, round(seconds * 1000), self._backend.name)
        metadata = object_metadata(request, fingerprint, facts)
        with clock.stage("upload"):
            stored = await retried(
                "storage", lambda: self.store(key, audio, request.output_format, metadata)
            )
        output = Output(stored, facts, cold_start=bool(result.cold_start))
        return self._audio_ready(request, output, clock, received)

    async def _retried(
        self,
        request_id: str,
        deadline: Deadline,
        progress: Progress,
        stage: RetriedStage,
        attempt: Callable[[], Awaitable[T]],
    ) -> T:
        """`attempt()`, again while it fails transiently, within the retry policy and the
        request's deadline; if it gives up, `progress` says how many attempts were made."""
        attempts = 0

        async def counted() -> T:
            nonlocal attempts
            attempts += 1
            return await attempt()

        try:
            return await retry(
                counted,
                transient=_transient,
                policy=self._retry,
                what=f"{stage} for {request_id}",
                on_retry=functools.partial(self._metrics.retried, stage),
                deadline=deadline.at,
            )
        except VoicecloneError:
            progress.attempts = attempts
            raise

    async def find_existing(self, key: str, fingerprint: str) -> Output | None:
        """The audio stored under `key` if it was made for the same content, else None."""
        info = await self._storage.head(key)
        if info is None or info.sha256 is None:  # no checksum record: not known complete
            return None
        facts = reusable_facts(info.metadata, fingerprint)
        if facts is None:
            return None
        url, expires_at = await self._storage.url_for(key)  # a fresh presigned URL
        stored = StoredObject(
            key=key,
            storage_uri=info.storage_uri,
            url=url,
            size_bytes=info.size_bytes,
            sha256=info.sha256,
            url_expires_at=expires_at,
        )
        return Output(stored, facts, cold_start=False)

    async def fetch_reference(self, request: CloneRequest) -> ReferenceAudio:
        voice = request.voice
        return await self._fetcher.fetch(voice.reference_audio_uri, voice.reference_audio_sha256)

    async def clone(
        self, request: CloneRequest, reference: ReferenceAudio, deadline: Deadline
    ) -> tuple[CloneResult, EncodedAudio]:
        """The backend's result for the request and its audio, read. The call may take the time
        the request has left, capped by the backend's own bound; none starts once it expired."""
        job = CloneJob(
            request_id=request.request_id,
            text=request.text,
            language=request.language.engine_name,
            model=request.model.size,
            reference_audio=reference.data,
            reference_sha256=reference.sha256,
            reference_text=request.voice.reference_text,
            reference_uri=request.voice.reference_audio_uri,
            output_format=request.output_format.value,
            generation=_generation(request),
        )
        budget = deadline.budget(self._backend.timeout_seconds)  # Expired: no call at all
        try:
            with self._metrics.backend_call(self._backend.name, job.model) as call:
                result = await self._backend.clone(job, timeout=budget)
                audio = EncodedAudio.read(result.audio)  # GenerationFailed if it is not audio
                call.result, call.audio_seconds = result, audio.facts.duration_seconds
        except BackendTimeout:
            deadline.check()  # cut short by the request's own deadline: it expired
            raise
        return result, audio

    async def encode(self, audio: EncodedAudio, wanted: AudioFormat) -> EncodedAudio:
        """The backend's audio in the wanted format, described from the final bytes themselves."""
        given = audio.facts.format
        try:
            check_audio_size(audio.data, audio.facts, self._limits.max_audio_bytes)
            if given == wanted.value:
                return audio
            # Transcoding is CPU work: keep it off the event loop.
            return EncodedAudio.read(await asyncio.to_thread(transcode, audio.data, wanted))
        except (InvalidInput, ValueError, RuntimeError) as exc:  # soundfile's errors
            raise GenerationFailed(
                f"the backend's {given} audio cannot be encoded as {wanted.value}: {exc}"
            ) from exc

    async def store(
        self, key: str, audio: EncodedAudio, fmt: AudioFormat, metadata: Mapping[str, str]
    ) -> StoredObject:
        return await self._storage.put(key, audio.data, fmt.content_type, metadata)

    def _audio_ready(
        self,
        request: CloneRequest,
        output: Output,
        clock: StageClock,
        received: datetime,
    ) -> AudioReady:
        completed_at = datetime.now(UTC)
        stored, facts = output.stored, output.facts
        return AudioReady(
            request_id=request.request_id,
            tenant_id=request.tenant_id,
            voice_id=request.voice.voice_id,
            audio_url=stored.url,
            storage_uri=stored.storage_uri,
            content_type=request.output_format.content_type,
            format=request.output_format,
            sample_rate=facts.sample_rate,
            duration_ms=facts.duration_ms,
            size_bytes=stored.size_bytes,
            sha256=stored.sha256,
            model=request.model,
            backend=facts.backend,
            language=request.language,
            cold_start=output.cold_start,
            timings=AudioTimings(
                queue_ms=_ms_between(request.created_at, received),
                # Stages skipped (the audio already existed) took no time.
                reference_fetch_ms=clock.ms.get("fetch_reference", 0),
                inference_ms=clock.ms.get("inference", 0),
                encode_ms=clock.ms.get("encode", 0),
                upload_ms=clock.ms.get("upload", 0),
                total_ms=_ms_between(request.created_at, completed_at),
            ),
            url_expires_at=stored.url_expires_at,
            completed_at=completed_at,
            metadata=request.metadata,
        )


def _ms_between(start: datetime, end: datetime) -> int:
    """Milliseconds from `start` (the request's created_at, the producer's clock) to `end`
    (ours); never negative, whatever the skew between the two clocks."""
    return max(0, round((end - start).total_seconds() * 1000))


def transcode(data: bytes, wanted: AudioFormat) -> bytes:
    """Re-encode audio a backend returned in another format than the request asked for."""
    audio = DecodedAudio.from_bytes(data)
    return encode_audio(audio.samples, audio.sample_rate, wanted)


def _transient(exc: Exception) -> bool:
    return isinstance(exc, VoicecloneError) and exc.transient


def _generation(request: CloneRequest) -> GenerationParams:
    """The request's generation parameters, checked against the engine's rules."""
    record = request.generation
    return GenerationParams() if record is None else record.params()
