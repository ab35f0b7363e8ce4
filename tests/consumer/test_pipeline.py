"""The pipeline's stages with real parts: file references, a seed-contract HTTP service, local
storage. What each failure becomes, and that the audio-ready event describes the stored file."""

import io
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile

from consumer.admission import Deadline, Expired
from consumer.backends import Backend, BackendSettings
from consumer.backends.http import HttpBackend
from consumer.errors import CloneError
from consumer.pipeline import EncodedAudio, Pipeline, check_request
from consumer.reference import ReferenceFetcher, ReferenceSettings
from consumer.settings import LimitSettings, RetrySettings
from consumer.telemetry import Metrics
from modal_app.audio import encode_audio
from producer.storage import LocalStorage, Storage, object_key
from schemas.vocabulary import AudioFormat, ErrorCode, GenerationFailed, VoicecloneError
from tests.consumer.backends.conftest import make_wav
from tests.fixtures.seed import SECONDS_PER_CHARACTER, SeedServer
from tests.fixtures.worker import clone_request

NOW = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
async def storage(tmp_path: Path) -> AsyncIterator[LocalStorage]:
    async with LocalStorage(tmp_path / "audio") as storage:
        yield storage


MakePipeline = Callable[..., Pipeline]


@pytest.fixture
async def make_pipeline(
    seed_server: SeedServer,
    reference_root: Path,
    storage: Storage,
) -> AsyncIterator[MakePipeline]:
    """Pipelines on the seed server, file references and `storage`; keyword arguments are
    LimitSettings fields, `retry=RetrySettings(...)`, `metrics=...` and `backend=...` (another
    started backend) go to the pipeline."""
    backend = HttpBackend(BackendSettings(kind="http", http={"base_url": seed_server.url}))
    await backend.start()
    references = ReferenceSettings(allowed_schemes=["file"], file_root=reference_root)
    async with ReferenceFetcher(references) as fetcher:

        def make(
            retry: RetrySettings | None = None,
            metrics: Metrics | None = None,
            backend: Backend = backend,
            **limits: Any,
        ) -> Pipeline:
            settings = LimitSettings(**({"max_text_chars": 100} | limits))
            return Pipeline(settings, fetcher, backend, storage, metrics, retry)

        yield make
    await backend.close()


@pytest.fixture
def pipeline(make_pipeline: MakePipeline) -> Pipeline:
    return make_pipeline()


def code_of(
    error: pytest.ExceptionInfo[CloneError] | pytest.ExceptionInfo[VoicecloneError],
) -> tuple[ErrorCode, bool]:
    return error.value.code, error.value.transient


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({"text": "   "}, ErrorCode.INVALID_REQUEST),
        ({"text": "a" * 101}, ErrorCode.TEXT_TOO_LONG),
        ({"request_id": "../../etc/passwd"}, ErrorCode.INVALID_REQUEST),
        ({"request_id": "a/b"}, ErrorCode.INVALID_REQUEST),
        ({"request_id": ".."}, ErrorCode.INVALID_REQUEST),
        ({"request_id": "x" * 129}, ErrorCode.INVALID_REQUEST),
        ({"tenant_id": "../other-tenant"}, ErrorCode.INVALID_REQUEST),
        ({"tenant_id": "a\\b"}, ErrorCode.INVALID_REQUEST),
        ({"tenant_id": "é"}, ErrorCode.INVALID_REQUEST),
    ],
)
def test_check_request_rejects(overrides: dict[str, object], code: ErrorCode) -> None:
    request = clone_request("file:///voice.wav", **overrides)

    with pytest.raises(VoicecloneError) as raised:
        check_request(request, LimitSettings(max_text_chars=100))

    assert code_of(raised) == (code, False)


@pytest.mark.parametrize("ago", [timedelta(0), timedelta(seconds=1)])
def test_a_passed_deadline_is_expired(ago: timedelta) -> None:
    deadline = Deadline.of(datetime.now(UTC) - ago)

    with pytest.raises(Expired) as raised:
        deadline.check()

    assert deadline.expired
    assert code_of(raised) == (ErrorCode.EXPIRED, False)
    assert raised.value.message == "the request's deadline passed"


def test_checks_accept_text_at_the_limit_and_a_future_deadline() -> None:
    request = clone_request(
        "file:///voice.wav", text="a" * 100, deadline=datetime.now(UTC) + timedelta(minutes=1)
    )
    deadline = Deadline.of(request.deadline)

    check_request(request, LimitSettings(max_text_chars=100))
    deadline.check()
    assert 59 < (deadline.remaining() or 0) <= 60
    assert Deadline.of(None).remaining() is None


async def test_an_unsafe_id_never_reaches_storage(
    pipeline: Pipeline, storage: LocalStorage, voice_uri: str, tmp_path: Path
) -> None:
    request = clone_request(voice_uri, tenant_id="..", request_id="escaped")

    with pytest.raises(CloneError) as raised:
        await pipeline.process(request)

    assert code_of(raised) == (ErrorCode.INVALID_REQUEST, False)
    assert "tenant_id" in raised.value.message
    assert files_under(tmp_path, "escaped.wav") == []
    assert files_under(storage.root, "*") == []


def files_under(root: Path, pattern: str) -> list[Path]:
    return [path for path in root.rglob(pattern) if path.is_file()]


@pytest.mark.parametrize("fmt", list(AudioFormat))
async def test_audio_ready_describes_the_stored_file_in_every_format(
    pipeline: Pipeline, storage: LocalStorage, voice_uri: str, fmt: AudioFormat
) -> None:
    # The seed service always answers WAV: every other format is transcoded by the worker.
    text = "x" * 40
    request = clone_request(voice_uri, text=text, output_format=fmt, generation=None)

    ready = await pipeline.process(request)

    extension = AudioFormat(fmt).extension
    path = storage.path_for(object_key(request.tenant_id, request.request_id, extension))
    data = path.read_bytes()
    samples, sample_rate = soundfile.read(io.BytesIO(data))
    assert ready.audio_url == path.as_uri()
    assert (ready.size_bytes, ready.content_type) == (len(data), AudioFormat(fmt).content_type)
    assert (ready.sample_rate, ready.duration_ms) == (
        sample_rate,
        round(len(samples) / sample_rate * 1000),
    )
    assert ready.duration_ms == round(len(text) * SECONDS_PER_CHARACTER * 1000)
    assert ready.backend == "http"
    assert set(ready.timings.model_dump()) >= {"reference_fetch_ms", "inference_ms", "upload_ms"}


async def test_a_voice_id_that_is_not_ascii_is_stored_as_metadata_escaped(
    pipeline: Pipeline, storage: LocalStorage, voice_uri: str
) -> None:
    request = clone_request(voice_uri)
    request = request.model_copy(
        update={"voice": request.voice.model_copy(update={"voice_id": " Zoë's voice / 2 "})}
    )

    ready = await pipeline.process(request)

    info = await storage.head(object_key(request.tenant_id, request.request_id, "wav"))
    assert info is not None
    assert info.metadata["voice-id"] == "%20Zo%C3%AB%27s%20voice%20%2F%202%20"
    assert ready.voice_id == " Zoë's voice / 2 "


async def test_a_deadline_that_cuts_inference_short_is_expired(
    pipeline: Pipeline,
    seed_server: SeedServer,
    voice_uri: str,
) -> None:
    seed_server.delay_seconds = 5
    request = clone_request(voice_uri, deadline=datetime.now(UTC) + timedelta(seconds=0.5))

    with pytest.raises(CloneError) as raised:
        await pipeline.process(request)

    assert code_of(raised) == (ErrorCode.EXPIRED, False)
    assert raised.value.message == "the request's deadline passed"


@pytest.mark.parametrize(
    ("reference", "code"),
    [
        ("missing.wav", ErrorCode.REFERENCE_AUDIO_UNAVAILABLE),
        ("not-audio.wav", ErrorCode.REFERENCE_AUDIO_INVALID),
    ],
)
async def test_reference_failures(
    pipeline: Pipeline, reference_root: Path, reference: str, code: ErrorCode
) -> None:
    (reference_root / "not-audio.wav").write_bytes(b"RIFF, but not really")

    with pytest.raises(CloneError) as raised:
        await pipeline.process(clone_request((reference_root / reference).as_uri()))

    assert code_of(raised) == (code, False)


async def test_a_request_past_its_deadline_never_reaches_the_backend(
    pipeline: Pipeline, seed_server: SeedServer, voice_uri: str
) -> None:
    request = clone_request(voice_uri)
    reference = await pipeline.fetch_reference(request)
    passed = Deadline(time.monotonic() - 0.001)  # e.g. during the reference's fetch

    with pytest.raises(Expired) as raised:
        await pipeline.clone(request, reference, passed)

    assert code_of(raised) == (ErrorCode.EXPIRED, False)
    assert seed_server.requests == []


async def test_the_backends_own_bound_caps_a_call_the_request_would_let_run_longer(
    make_pipeline: MakePipeline, seed_server: SeedServer, voice_uri: str
) -> None:
    seed_server.delay_seconds = 30
    settings = BackendSettings(kind="http", timeout_seconds=0.3, http={"base_url": seed_server.url})
    backend = HttpBackend(settings)
    await backend.start()
    pipeline = make_pipeline(backend=backend, retry=RetrySettings(max_attempts=1))
    in_a_minute = datetime.now(UTC) + timedelta(minutes=1)
    started = time.monotonic()
    try:
        for deadline in (None, in_a_minute):
            with pytest.raises(CloneError) as raised:
                await pipeline.process(clone_request(voice_uri, deadline=deadline))
            assert code_of(raised) == (ErrorCode.INFERENCE_TIMEOUT, True)
    finally:
        await backend.close()

    assert time.monotonic() - started < 2.0
    assert len(seed_server.requests) == 2


async def test_a_backend_answer_that_is_not_audio_is_a_failed_inference(
    pipeline: Pipeline, seed_server: SeedServer, voice_uri: str
) -> None:
    seed_server.respond_with = (200, {"audio": "somewhere else"})

    with pytest.raises(CloneError) as raised:
        await pipeline.process(clone_request(voice_uri))

    assert code_of(raised) == (ErrorCode.INFERENCE_FAILED, False)
    assert "that are not audio" in raised.value.message


async def test_audio_that_cannot_be_encoded_is_a_failed_inference(pipeline: Pipeline) -> None:
    audio = EncodedAudio.read(make_wav(1.0, sample_rate=44_100))

    with pytest.raises(GenerationFailed) as raised:
        await pipeline.encode(audio, AudioFormat.OGG_OPUS)  # Opus has no 44.1 kHz

    assert code_of(raised) == (ErrorCode.INFERENCE_FAILED, False)
    assert "the backend's WAV audio cannot be encoded as OGG_OPUS" in raised.value.message


@pytest.mark.parametrize(
    ("data", "decoded"),
    [
        (make_wav(1.0, sample_rate=24_000), 96_000),  # 48 kB as sent, 96 kB decoded
        # Ten seconds of silence: a few kB of FLAC, 960 kB once decoded for transcoding.
        (encode_audio(np.zeros(240_000, dtype=np.float32), 24_000, AudioFormat.FLAC), 960_000),
    ],
)
async def test_audio_over_the_size_limit_is_refused_before_transcoding_or_storing(
    make_pipeline: MakePipeline, data: bytes, decoded: int
) -> None:
    audio = EncodedAudio.read(data)

    with pytest.raises(GenerationFailed) as raised:
        await make_pipeline(max_audio_bytes=decoded - 1).encode(audio, AudioFormat.WAV)
    encoded = await make_pipeline(max_audio_bytes=decoded).encode(audio, AudioFormat.WAV)

    assert code_of(raised) == (ErrorCode.INFERENCE_FAILED, False)
    assert f"{decoded} bytes decoded" in raised.value.message
    assert encoded.facts.sample_rate == 24_000


async def test_total_ms_runs_from_the_requests_created_at_as_its_schema_says(
    pipeline: Pipeline, voice_uri: str
) -> None:
    # audio_ready.avsc: total_ms is "From created_at of the request until completed_at".
    request = clone_request(voice_uri).model_copy(
        update={"created_at": datetime.now(UTC) - timedelta(seconds=3)}
    )

    ready = await pipeline.process(request)

    timings = ready.timings
    assert timings.queue_ms >= 3000
    assert timings.total_ms >= timings.queue_ms + timings.inference_ms + timings.upload_ms
    elapsed = (ready.completed_at - request.created_at).total_seconds() * 1000
    assert abs(timings.total_ms - elapsed) <= 5
