"""Outcomes as the worker publishes them, for tests of the client and the CLI that follow them.

The worker itself is tested elsewhere; here outcomes are published straight to the topics with
the real `OutcomePublisher`, audio written with the real `LocalStorage`.
"""

from datetime import UTC, datetime
from pathlib import Path

from producer.publisher import OutcomePublisher
from producer.settings import ClientSettings, KafkaSettings
from producer.storage import LocalStorage, StorageSettings, object_key
from schemas.events import (
    AudioFormat,
    AudioReady,
    AudioTimings,
    CloneFailed,
    ErrorCode,
    Language,
    ModelName,
)
from schemas.topics import Topics
from schemas.wire_format import make_codec

TENANT = "tenant-a"


def client_settings(bootstrap: str, topics: Topics, storage_root: Path) -> ClientSettings:
    return ClientSettings(
        kafka=KafkaSettings(bootstrap_servers=bootstrap, client_id="test"),
        topics=topics,
        storage=StorageSettings(kind="local", local_root=storage_root),
    )


async def stored_audio_ready(storage_root: Path, request_id: str, audio: bytes) -> AudioReady:
    """Store `audio` as the worker would and describe it in an AudioReady."""
    async with LocalStorage(storage_root) as storage:
        stored = await storage.put(object_key(TENANT, request_id, "wav"), audio, "audio/wav", {})
    return AudioReady(
        request_id=request_id,
        tenant_id=TENANT,
        voice_id="voice-1",
        audio_url=stored.url,
        storage_uri=stored.storage_uri,
        content_type="audio/wav",
        format=AudioFormat.WAV,
        sample_rate=24_000,
        duration_ms=1000,
        size_bytes=stored.size_bytes,
        sha256=stored.sha256,
        model=ModelName.QWEN3_TTS_12HZ_1_7B_BASE,
        backend="local",
        language=Language.ENGLISH,
        cold_start=False,
        timings=AudioTimings(
            queue_ms=1, reference_fetch_ms=1, inference_ms=1, encode_ms=1, upload_ms=1, total_ms=5
        ),
        completed_at=datetime.now(UTC),
        metadata={"trace": request_id},
    )


def clone_failed(request_id: str) -> CloneFailed:
    return CloneFailed(
        request_id=request_id,
        tenant_id=TENANT,
        error_code=ErrorCode.REFERENCE_AUDIO_UNAVAILABLE,
        message="reference does not exist",
        retryable=False,
        attempts=1,
        failed_at=datetime.now(UTC),
    )


async def publish(settings: ClientSettings, *outcomes: AudioReady | CloneFailed) -> None:
    """Publish `outcomes` in order, each acknowledged before the next."""
    publisher = OutcomePublisher(settings.kafka, settings.topics, make_codec())
    await publisher.start()
    try:
        for outcome in outcomes:
            await publisher.publish(outcome)
    finally:
        await publisher.stop()
