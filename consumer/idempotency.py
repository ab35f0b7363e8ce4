"""Recognising audio a request already produced, so a redelivered request is not regenerated.

A request's object key is fixed by its tenant and request ids. Next to the audio the worker
stores a fingerprint of everything in the request that shapes the audio, plus the facts its
audio-ready event reports (sample rate, duration, backend), so the event can be rebuilt from a
`head` of the object without downloading it. The same ids with other content (a reused
request id) have another fingerprint: that audio is regenerated and overwritten.
"""

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote

from schemas.events import CloneRequest

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
