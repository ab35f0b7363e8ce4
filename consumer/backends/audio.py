"""Facts about audio bytes a backend returned, read from their header."""

import io
from dataclasses import dataclass

import soundfile

from consumer.backends.errors import GenerationFailed


@dataclass(frozen=True)
class AudioFacts:
    format: str  # in the worker's vocabulary: "WAV", "FLAC", "OGG_OPUS", "MP3", ...
    sample_rate: int
    duration_seconds: float


def read_audio_facts(audio: bytes) -> AudioFacts:
    """Format, sample rate and duration of `audio`; `GenerationFailed` if it is not audio.

    Reads only the header, so it is cheap enough to run on the event loop.
    """
    try:
        info = soundfile.info(io.BytesIO(audio))
    except soundfile.SoundFileError as exc:
        raise GenerationFailed(
            f"the backend returned {len(audio)} bytes that are not audio"
        ) from exc
    audio_format = "OGG_OPUS" if (info.format, info.subtype) == ("OGG", "OPUS") else info.format
    return AudioFacts(audio_format, int(info.samplerate), float(info.duration))
