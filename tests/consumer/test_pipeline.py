"""The pipeline's stages with real parts: file references, a seed-contract HTTP service, local
storage. What each failure becomes, and that the audio-ready event describes the stored file."""

import io
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile

from consumer.admission import Deadline, Expired
from consumer.backends import BackendSettings, CloneResult
from consumer.backends.http import HttpBackend
from consumer.errors import CloneError
from consumer.metrics import Metrics
from consumer.pipeline import Pipeline, check_request
from consumer.reference import ReferenceFetcher, ReferenceSettings
from consumer.settings import LimitSettings, RetrySettings
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
    LimitSettings fields, `retry=RetrySettings(...)` and `metrics=...` go to the pipeline."""
    backend = HttpBackend(BackendSettings(kind="http", http={"base_url": seed_server.url}))
    await backend.start()
    references = ReferenceSettings(allowed_schemes=["file"], file_root=reference_root)
    async with ReferenceFetcher(references) as fetcher:

        def make(
            retry: RetrySettings | None = None, metrics: Metrics | None = None, **limits: Any
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


def backend_result(audio: bytes) -> CloneResult:
    return CloneResult(
        audio=audio,
        format="WAV",
        sample_rate=44_100,
        duration_seconds=1.0,
        cold_start=None,
        model_load_seconds=None,
        container_id=None,
        inference_seconds=None,
    )


@pytest.mark.parametrize(
    ("audio", "wanted"),
    [
        (make_wav(1.0, sample_rate=44_100), AudioFormat.OGG_OPUS),  # Opus has no 44.1 kHz
        (b"not audio at all", AudioFormat.WAV),
    ],
)
async def test_audio_that_cannot_be_encoded_is_a_failed_inference(
    pipeline: Pipeline, audio: bytes, wanted: AudioFormat
) -> None:
    with pytest.raises(GenerationFailed) as raised:
        await pipeline.encode(backend_result(audio), wanted)

    assert code_of(raised) == (ErrorCode.INFERENCE_FAILED, False)


@pytest.mark.parametrize(
    ("audio", "declared"),
    [
        (make_wav(1.0, sample_rate=24_000), "WAV"),  # 48 kB as sent, 96 kB decoded
        # Ten seconds of silence: a few kB of FLAC, 960 kB once decoded for transcoding.
        (encode_audio(np.zeros(240_000, dtype=np.float32), 24_000, AudioFormat.FLAC), "FLAC"),
    ],
)
async def test_audio_over_the_size_limit_is_refused_before_transcoding_or_storing(
    make_pipeline: MakePipeline, audio: bytes, declared: str
) -> None:
    result = replace(backend_result(audio), format=declared)
    decoded = 96_000 if declared == "WAV" else 960_000

    with pytest.raises(GenerationFailed) as raised:
        await make_pipeline(max_audio_bytes=decoded - 1).encode(result, AudioFormat.WAV)
    encoded = await make_pipeline(max_audio_bytes=decoded).encode(result, AudioFormat.WAV)

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
