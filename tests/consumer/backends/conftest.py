"""Shared pieces of the backend tests: real audio and a clone job to send."""

import hashlib
import io
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import soundfile

from consumer.backends import CloneJob, GenerationParams

CloneJobFactory = Callable[..., CloneJob]


def make_wav(seconds: float, sample_rate: int = 24_000) -> bytes:
    """A real PCM16 WAV: a quiet tone of the given length."""
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    samples = 0.1 * np.sin(2 * np.pi * 220.0 * t)
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def reference_audio() -> bytes:
    return make_wav(1.5, sample_rate=16_000)


@pytest.fixture
def clone_job(reference_audio: bytes) -> CloneJobFactory:
    """Build a clone job; keyword arguments override the defaults."""

    def build(**overrides: Any) -> CloneJob:
        fields: dict[str, Any] = {
            "request_id": "req-1",
            "text": "Hello from the voice cloning worker.",
            "language": "English",
            "model": "1.7B",
            "reference_audio": reference_audio,
            "reference_sha256": hashlib.sha256(reference_audio).hexdigest(),
            "reference_text": "This is my reference voice.",
            "reference_uri": "s3://voices/ref.wav",
            "output_format": "WAV",
            "generation": GenerationParams(),
        }
        fields.update(overrides)
        return CloneJob(**fields)

    return build
