"""Sample events: a full one (every optional field set, unicode everywhere) and a minimal one
(only required fields) per event type, with the Topics field of the topic each belongs on."""

from datetime import UTC, datetime, timedelta

from schemas.events import (
    AudioFormat,
    AudioReady,
    AudioTimings,
    CloneCancel,
    CloneFailed,
    CloneRequest,
    ErrorCode,
    Event,
    GenerationRecord,
    Language,
    ModelName,
    VoiceReference,
)

CREATED = datetime(2025, 3, 14, 15, 9, 26, 535000, tzinfo=UTC)
SHA = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
UNICODE_TEXT = "你好\uff0c世界! Grüß Gott — こんにちは 🎙️ \u200b\x00 end"


def full_request() -> CloneRequest:
    return CloneRequest(
        request_id="req_2025-03-14.001",
        tenant_id="tenant-42",
        voice=VoiceReference(
            voice_id="voix-élodie",
            reference_audio_uri="s3://voices/élodie/ref.wav",
            reference_text="Bonjour, je m'appelle Élodie.",
            reference_audio_sha256=SHA,
        ),
        text=UNICODE_TEXT,
        language=Language.CHINESE,
        model=ModelName.QWEN3_TTS_12HZ_0_6B_BASE,
        output_format=AudioFormat.OGG_OPUS,
        generation=GenerationRecord(
            temperature=0.7,
            top_k=50,
            top_p=0.95,
            repetition_penalty=1.05,
            max_new_tokens=2048,
            seed=-(2**63),
        ),
        deadline=CREATED + timedelta(minutes=5),
        created_at=CREATED,
        metadata={"trace-id": "abc123", "ключ": "значение 🎧", "": ""},
    )


def minimal_request() -> CloneRequest:
    return CloneRequest(
        request_id="r",
        tenant_id="t",
        voice=VoiceReference(voice_id="v", reference_audio_uri="https://example.com/a.wav"),
        text="",
        created_at=CREATED,
    )


def full_audio_ready() -> AudioReady:
    return AudioReady(
        request_id="req_2025-03-14.001",
        tenant_id="tenant",
        voice_id="voix-élodie",
        audio_url="https://cdn.example.com/a.ogg?X-Amz-Signature=%E2%9C%93",
        storage_uri="s3://audio/tenant/req_2025-03-14.001.ogg",
        content_type="audio/ogg",
        format=AudioFormat.OGG_OPUS,
        sample_rate=24000,
        duration_ms=3250,
        size_bytes=2**40,
        sha256=SHA,
        model=ModelName.QWEN3_TTS_12HZ_0_6B_BASE,
        backend="modal",
        language=Language.CHINESE,
        cold_start=True,
        timings=AudioTimings(
            queue_ms=12,
            reference_fetch_ms=80,
            inference_ms=2900,
            encode_ms=40,
            upload_ms=95,
            total_ms=3127,
        ),
        url_expires_at=CREATED + timedelta(hours=1),
        completed_at=CREATED + timedelta(seconds=3),
        metadata={"trace-id": "abc123", "ключ": "значение 🎧"},
    )


def minimal_audio_ready() -> AudioReady:
    return AudioReady(
        request_id="r",
        tenant_id="t",
        voice_id="v",
        audio_url="file:///tmp/a.wav",
        storage_uri="file:///tmp/a.wav",
        content_type="audio/wav",
        format=AudioFormat.WAV,
        sample_rate=0,
        duration_ms=0,
        size_bytes=0,
        sha256=SHA.upper(),
        model=ModelName.QWEN3_TTS_12HZ_1_7B_BASE,
        backend="",
        language=Language.AUTO,
        cold_start=False,
        timings=AudioTimings(
            queue_ms=0, reference_fetch_ms=0, inference_ms=0, encode_ms=0, upload_ms=0, total_ms=0
        ),
        completed_at=CREATED,
    )


def full_failed() -> CloneFailed:
    return CloneFailed(
        request_id="req_2025-03-14.001",
        tenant_id="tenant",
        error_code=ErrorCode.REFERENCE_AUDIO_UNAVAILABLE,
        message="GET s3://voices/élodie/ref.wav: 503 — réessayez",
        retryable=True,
        attempts=3,
        failed_at=CREATED,
        metadata={"trace-id": "abc123"},
    )


def minimal_failed() -> CloneFailed:
    return CloneFailed(
        request_id="r",
        tenant_id="t",
        error_code=ErrorCode.CANCELLED,
        message="",
        retryable=False,
        attempts=0,
        failed_at=CREATED,
    )


def full_cancel() -> CloneCancel:
    return CloneCancel(
        request_id="req_2025-03-14.001",
        tenant_id="tenant",
        requested_at=CREATED,
        metadata={"reason": "user pressed stop ⏹"},
    )


def minimal_cancel() -> CloneCancel:
    return CloneCancel(request_id="r", tenant_id="t", requested_at=CREATED)


_MAKERS = [
    ("requests", full_request),
    ("requests", minimal_request),
    ("audio_ready", full_audio_ready),
    ("audio_ready", minimal_audio_ready),
    ("failed", full_failed),
    ("failed", minimal_failed),
    ("cancel", full_cancel),
    ("cancel", minimal_cancel),
]
# (Topics field, event) for every sample, and a test id for each.
SAMPLES: list[tuple[str, Event]] = [(field, make()) for field, make in _MAKERS]
SAMPLE_IDS = [make.__name__ for _, make in _MAKERS]
