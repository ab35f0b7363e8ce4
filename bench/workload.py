"""What the benchmarks send: reference recordings on disk and clone requests naming them."""

import hashlib
import io
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import soundfile

from bench.kafka import Message
from schemas.codec import Codec
from schemas.events import CloneRequest, VoiceReference

_REFERENCE_RATE = 48_000
_BYTES_PER_SECOND = _REFERENCE_RATE * 2  # mono, 16-bit
_TEXT = "The benchmark says this sentence, again and again."
_TRANSCRIPT = "What the reference recording says."


@dataclass(frozen=True, slots=True)
class Reference:
    """A reference recording under the worker's `file_root`, pinned by its checksum."""

    uri: str
    sha256: str
    size_bytes: int


def write_reference(directory: Path, size_bytes: int, seed: int = 0) -> Reference:
    """A mono 16-bit 48 kHz WAV of about `size_bytes` (noise, so no two seeds share bytes)."""
    frames = max(1, size_bytes // 2)
    rng = np.random.default_rng(seed)
    samples = rng.integers(-3000, 3000, frames, dtype=np.int16)
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, _REFERENCE_RATE, format="WAV", subtype="PCM_16")
    data = buffer.getvalue()
    path = directory / f"reference-{seed}-{len(data)}.wav"
    path.write_bytes(data)
    return Reference(path.resolve().as_uri(), hashlib.sha256(data).hexdigest(), len(data))


def reference_seconds(size_bytes: int) -> float:
    """How long a reference of `size_bytes` written by `write_reference` plays."""
    return size_bytes / _BYTES_PER_SECOND


def clone_request(reference: Reference, request_id: str | None = None) -> CloneRequest:
    """A valid request in the reference's voice, sent as the client library would."""
    return CloneRequest(
        request_id=request_id or uuid.uuid4().hex,
        tenant_id="bench",
        voice=VoiceReference(
            voice_id="bench-voice",
            reference_audio_uri=reference.uri,
            reference_text=_TRANSCRIPT,
            reference_audio_sha256=reference.sha256,
        ),
        text=_TEXT,
        created_at=datetime.now(UTC),
    )


async def encode_request(codec: Codec, topic: str, request: CloneRequest) -> Message:
    """The record the client library would produce for `request` (keyed by its id)."""
    encoded = await codec.encode(topic, request)
    return Message(request.request_id.encode(), encoded.value, encoded.headers)


async def request_messages(
    codec: Codec, topic: str, references: list[Reference], count: int
) -> list[Message]:
    """`count` encoded requests, naming the references in turn."""
    return [
        await encode_request(codec, topic, clone_request(references[i % len(references)]))
        for i in range(count)
    ]
