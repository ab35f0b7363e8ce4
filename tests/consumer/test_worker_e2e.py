"""Fifty requests through the real engine (a tiny random Qwen3-TTS), on the real broker, into
each kind of storage: every request gets exactly one audio-ready event whose URL downloads
audio that decodes to the sample rate and duration the event states, and the worker's metrics
count the engine's one cold start."""

import asyncio
import io
import itertools
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

import httpx
import pytest
import soundfile

from consumer.backends import BackendSettings, LocalBackendSettings
from consumer.observability.settings import HttpServerSettings
from consumer.reference import ReferenceSettings
from consumer.settings import WorkerSettings
from producer.storage import StorageSettings, reference_key
from schemas.events import AudioFormat, AudioReady, GenerationRecord, Language, ModelName
from tests.fixtures.model import SAMPLE_RATE, frames_to_samples
from tests.fixtures.s3 import S3Server
from tests.fixtures.worker import (
    Outcomes,
    Requests,
    WorkerSettingsFactory,
    clone_request,
    group_lag,
    running_worker,
    scrape_worker,
    sha256_of,
)

pytestmark = [pytest.mark.engine, pytest.mark.timeout(300)]

REQUESTS = 50


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def storage_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def engine_settings(
    make_worker_settings: WorkerSettingsFactory,
    tiny_model_dir: Path,
    reference_root: Path,
    reference_wav: bytes,
    storage_kind: str,
    request: pytest.FixtureRequest,
    unused_tcp_port: int,
) -> tuple[WorkerSettings, str]:
    """Settings for the local backend on the tiny model, and the reference's URI: a file for
    local storage, an object in the output bucket for S3 (read back through the storage)."""
    model = str(tiny_model_dir)
    backend = BackendSettings(
        kind="local", local=LocalBackendSettings(model_1_7b=model, model_0_6b=model, device="cpu")
    )
    http = HttpServerSettings(host="127.0.0.1", port=unused_tcp_port)
    if storage_kind == "local":
        settings = make_worker_settings(backend=backend, max_in_flight=8, http=http)
        return settings, (reference_root / "voice.wav").as_uri()
    storage: StorageSettings = request.getfixturevalue("s3_storage_settings")
    server: S3Server = request.getfixturevalue("s3_server")
    assert storage.bucket is not None
    # Where `voiceclone request` uploads it: the only place of the output bucket the worker reads.
    key = reference_key(sha256_of(reference_wav), "wav")
    server.client().put_object(Bucket=storage.bucket, Key=key, Body=reference_wav)
    settings = make_worker_settings(
        backend=backend,
        storage=storage,
        reference=ReferenceSettings(allowed_schemes=["s3"], allowed_buckets=[storage.bucket]),
        max_in_flight=8,
        http=http,
    )
    return settings, f"s3://{storage.bucket}/{key}"


async def download(url: str) -> bytes:
    """What a subscriber gets from an audio-ready URL: a file:// path or a presigned GET."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        return await asyncio.to_thread(Path(url2pathname(parts.path)).read_bytes)
    async with httpx.AsyncClient() as client:
        response = await client.get(url)
    response.raise_for_status()
    return response.content


async def test_fifty_mixed_requests_each_give_one_playable_audio_ready(
    engine_settings: tuple[WorkerSettings, str], storage_kind: str
) -> None:
    settings, reference_uri = engine_settings
    formats, languages = itertools.cycle(AudioFormat), itertools.cycle(Language)
    models, tokens = itertools.cycle(ModelName), itertools.cycle((3, 4, 6))
    batch = [
        clone_request(
            reference_uri,
            output_format=next(formats),
            language=next(languages),
            model=next(models),
            generation=GenerationRecord(max_new_tokens=next(tokens)),
        )
        for _ in range(REQUESTS)
    ]
    assert len({r.output_format for r in batch}) == len(AudioFormat)

    async with (
        Requests(settings) as requests,
        Outcomes(settings) as outcomes,
        running_worker(settings),
    ):
        await requests.send(*batch)
        await outcomes.wait_for([r.request_id for r in batch], within_s=120)
        metrics = await scrape_worker(settings)

    assert sum(len(found) for found in outcomes.by_id.values()) == REQUESTS  # exactly one each
    assert outcomes.dead_letters == []
    for request in batch:
        ready = outcomes.first(request.request_id)
        assert isinstance(ready, AudioReady), ready
        assert (ready.format, ready.language, ready.model, ready.backend) == (
            request.output_format,
            request.language,
            request.model,
            "local",
        )
        assert ready.metadata == request.metadata
        assert (ready.url_expires_at is None) == (storage_kind == "local")
        data = await download(ready.audio_url)
        assert (len(data), sha256_of(data)) == (ready.size_bytes, ready.sha256)
        samples, sample_rate = soundfile.read(io.BytesIO(data))
        assert request.generation is not None
        assert request.generation.max_new_tokens is not None
        expected_samples = frames_to_samples(request.generation.max_new_tokens)
        assert (sample_rate, len(samples)) == (ready.sample_rate, expected_samples)
        assert ready.sample_rate == SAMPLE_RATE
        assert ready.duration_ms == round(len(samples) / sample_rate * 1000)

    # One engine serves both sizes: its first call is the one cold start, with its load time.
    calls = "voiceclone_backend_call_duration_seconds_count"
    assert metrics.value(calls, backend="local", cold_start="true") == 1
    assert metrics.value(calls, backend="local", cold_start="false") == REQUESTS - 1
    assert metrics.value("voiceclone_cold_starts_total", backend="local") == 1
    assert metrics.value("voiceclone_model_load_seconds_count", backend="local") == 1
    assert metrics.value("voiceclone_real_time_factor_count") == REQUESTS

    lag = await group_lag(
        settings.kafka.bootstrap_servers, settings.group_id, settings.topics.requests
    )
    assert set(lag.values()) == {0}, lag
