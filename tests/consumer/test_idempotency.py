"""A redelivered request is described again from its stored audio, not regenerated; the same
ids with other content are regenerated. On a local directory and on S3 (MinIO), through the
pipeline and through a running worker (on Kafka in memory)."""

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from consumer.backends import BackendSettings
from consumer.pipeline import FINGERPRINT, request_fingerprint
from producer.storage import LocalStorage, Storage, object_key
from schemas.events import (
    AudioFormat,
    AudioReady,
    CloneRequest,
    GenerationRecord,
    Language,
    ModelName,
)
from tests.consumer.test_pipeline import MakePipeline, make_pipeline  # noqa: F401 (fixture)
from tests.fixtures.memory_kafka import MemoryKafka
from tests.fixtures.seed import SeedServer
from tests.fixtures.worker import (
    Outcomes,
    Requests,
    WorkerSettingsFactory,
    clone_request,
    running_worker,
    sha256_of,
)
from tests.producer.test_storage import download, storage, storage_kind  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(120)

# Facts of the run rather than of the audio: they differ between two deliveries.
_PER_DELIVERY = {"timings", "completed_at", "cold_start", "audio_url", "url_expires_at"}


def described(event: AudioReady) -> dict[str, Any]:
    """What an audio-ready event says about the audio itself."""
    return event.model_dump(exclude=_PER_DELIVERY)


def request_in(voice: str, **overrides: Any) -> CloneRequest:
    # No max_new_tokens: the seed service's audio then lasts as long as the text asks.
    return clone_request(voice, generation=None, **overrides)


def key_of(request: CloneRequest) -> str:
    return object_key(request.tenant_id, request.request_id, "wav")


async def test_a_redelivered_request_is_described_again_without_generating(
    make_pipeline: MakePipeline,  # noqa: F811
    storage: Storage,  # noqa: F811
    seed_server: SeedServer,
    voice_uri: str,
) -> None:
    pipeline = make_pipeline()
    request = request_in(voice_uri)

    first = await pipeline.process(request)
    again = await pipeline.process(request)

    assert len(seed_server.requests) == 1
    assert described(again) == described(first)
    assert (again.timings.inference_ms, again.timings.upload_ms, again.cold_start) == (0, 0, False)
    assert sha256_of(await download(again.audio_url)) == first.sha256
    info = await storage.head(key_of(request))
    assert info is not None
    assert info.metadata[FINGERPRINT] == request_fingerprint(request)


async def test_the_same_ids_with_other_content_are_regenerated_and_overwritten(
    make_pipeline: MakePipeline,  # noqa: F811
    storage: Storage,  # noqa: F811
    seed_server: SeedServer,
    voice_uri: str,
) -> None:
    pipeline = make_pipeline()
    request = request_in(voice_uri, text="Short.")
    reused_id = request.model_copy(update={"text": "Something else, and rather longer."})

    first = await pipeline.process(request)
    second = await pipeline.process(reused_id)
    second_again = await pipeline.process(reused_id)

    assert len(seed_server.requests) == 2
    assert second.storage_uri == first.storage_uri  # the same key, overwritten
    assert (second.sha256, second.duration_ms) != (first.sha256, first.duration_ms)
    assert described(second_again) == described(second)
    info = await storage.head(key_of(request))
    assert info is not None
    assert info.sha256 == second.sha256


async def test_an_object_not_made_by_the_worker_is_regenerated(
    make_pipeline: MakePipeline,  # noqa: F811
    storage: Storage,  # noqa: F811
    seed_server: SeedServer,
    voice_uri: str,
) -> None:
    request = request_in(voice_uri)
    await storage.put(key_of(request), b"someone else's bytes", "audio/wav", {"x": "y"})

    ready = await make_pipeline().process(request)

    assert len(seed_server.requests) == 1
    assert sha256_of(await download(ready.audio_url)) == ready.sha256
    assert ready.size_bytes != len(b"someone else's bytes")


@pytest.mark.parametrize("storage_kind", ["local"])
async def test_local_audio_whose_checksum_record_was_lost_is_regenerated(
    make_pipeline: MakePipeline,  # noqa: F811
    storage: LocalStorage,  # noqa: F811
    seed_server: SeedServer,
    voice_uri: str,
) -> None:
    pipeline = make_pipeline()
    request = request_in(voice_uri)
    await pipeline.process(request)
    sidecar = storage.path_for(key_of(request)).with_name(f"{request.request_id}.wav@meta.json")
    await asyncio.to_thread(sidecar.unlink)  # as a crash between the two renames leaves it

    await pipeline.process(request)

    assert len(seed_server.requests) == 2


async def test_duplicates_in_flight_together_make_one_backend_call(
    make_pipeline: MakePipeline,  # noqa: F811
    seed_server: SeedServer,
    voice_uri: str,
) -> None:
    pipeline = make_pipeline()
    request = request_in(voice_uri)
    seed_server.delay_seconds = 0.3

    first, second = await asyncio.gather(pipeline.process(request), pipeline.process(request))

    assert len(seed_server.requests) == 1
    assert described(first) == described(second)


async def test_a_redelivery_past_the_deadline_still_gets_the_audio_it_produced(
    make_pipeline: MakePipeline,  # noqa: F811
    seed_server: SeedServer,
    voice_uri: str,
) -> None:
    pipeline = make_pipeline()
    request = request_in(voice_uri, deadline=datetime.now(UTC) + timedelta(minutes=1))
    first = await pipeline.process(request)
    late = request.model_copy(update={"deadline": datetime.now(UTC) - timedelta(seconds=1)})

    again = await pipeline.process(late)  # its outcome exists: not EXPIRED

    assert described(again) == described(first)
    assert len(seed_server.requests) == 1


BASE = clone_request("s3://voices/a.wav", generation=GenerationRecord(seed=1))


@pytest.mark.parametrize(
    "change",
    [
        {"text": BASE.text + "!"},
        {"voice": BASE.voice.model_copy(update={"reference_audio_uri": "s3://voices/b.wav"})},
        {"voice": BASE.voice.model_copy(update={"reference_audio_sha256": "ab" * 32})},
        {"voice": BASE.voice.model_copy(update={"reference_text": "Other words."})},
        {"language": Language.GERMAN},
        {"model": ModelName.QWEN3_TTS_12HZ_0_6B_BASE},
        {"output_format": AudioFormat.FLAC},
        {"generation": GenerationRecord(seed=2)},
        {"generation": None},
    ],
)
def test_the_fingerprint_covers_what_shapes_the_audio(change: dict[str, Any]) -> None:
    assert request_fingerprint(BASE.model_copy(update=change)) != request_fingerprint(BASE)


@pytest.mark.parametrize(
    "change",
    [
        {"metadata": {"other": "metadata"}},
        {"created_at": datetime(2020, 1, 1, tzinfo=UTC)},
        {"deadline": datetime(2030, 1, 1, tzinfo=UTC)},
        {"voice": BASE.voice.model_copy(update={"voice_id": "a label only"})},
    ],
)
def test_the_fingerprint_ignores_what_does_not(change: dict[str, Any]) -> None:
    assert request_fingerprint(BASE.model_copy(update=change)) == request_fingerprint(BASE)


@pytest.mark.parametrize("kind", ["local", pytest.param("s3", marks=pytest.mark.s3)])
async def test_a_request_sent_twice_gets_two_identical_outcomes_and_one_backend_call(
    make_memory_settings: WorkerSettingsFactory,
    memory_kafka: MemoryKafka,
    seed_server: SeedServer,
    voice_uri: str,
    request: pytest.FixtureRequest,
    kind: str,
) -> None:
    overrides: dict[str, Any] = {}
    if kind == "s3":
        overrides["storage"] = request.getfixturevalue("s3_storage_settings")
    settings = make_memory_settings(
        backend=BackendSettings(kind="http", http={"base_url": seed_server.url}), **overrides
    )
    sent = clone_request(voice_uri)

    async with (
        Requests(settings, memory_kafka) as requests,
        Outcomes(settings, memory_kafka) as outcomes,
        running_worker(settings, memory_kafka),
    ):
        await requests.send(sent, sent)  # same key, same partition: one after the other
        await outcomes.wait_for_repeats(sent.request_id, 2)

    first, second = outcomes.by_id[sent.request_id]
    assert isinstance(first, AudioReady)
    assert isinstance(second, AudioReady)
    assert described(first) == described(second)
    assert len(seed_server.requests) == 1
