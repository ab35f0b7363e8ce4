"""Audio in and out: decode reference audio, encode results (in the vocabulary's
`AudioFormat`s), join chunks.

numpy and soundfile only (no torch), so the worker can reuse the encoder without the engine.
"""

import io
from dataclasses import dataclass
from typing import Self

import numpy as np
import soundfile as sf

from schemas.vocabulary import AudioFormat, InvalidInput

# (libsndfile container, subtype). 16-bit PCM matches the seed's WAV output.
_SOUNDFILE_FORMATS = {
    AudioFormat.WAV: ("WAV", "PCM_16"),
    AudioFormat.FLAC: ("FLAC", "PCM_16"),
    AudioFormat.OGG_OPUS: ("OGG", "OPUS"),
    AudioFormat.MP3: ("MP3", "MPEG_LAYER_III"),
}
# Opus only runs at these rates; libsndfile fails obscurely at others.
_OPUS_SAMPLE_RATES = frozenset({8000, 12000, 16000, 24000, 48000})


@dataclass(frozen=True)
class DecodedAudio:
    """Mono float32 samples in [-1, 1] and their sample rate."""

    samples: np.ndarray
    sample_rate: int

    @property
    def duration_seconds(self) -> float:
        return len(self.samples) / self.sample_rate

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        """Decode any container libsndfile reads (WAV, FLAC, OGG, MP3, ...), mixed down to mono."""
        if not data:
            raise InvalidInput("Reference audio is empty")
        try:
            samples, sample_rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        except (sf.SoundFileError, RuntimeError) as exc:
            raise InvalidInput(f"Could not decode reference audio: {exc}") from exc
        return cls(samples=samples.mean(axis=1, dtype=np.float32), sample_rate=int(sample_rate))


def encode_audio(samples: np.ndarray, sample_rate: int, audio_format: AudioFormat) -> bytes:
    """Encode mono float samples; values outside [-1, 1] are clipped rather than wrapped."""
    if audio_format is AudioFormat.OGG_OPUS and sample_rate not in _OPUS_SAMPLE_RATES:
        raise ValueError(f"Opus cannot encode {sample_rate} Hz audio")
    container, subtype = _SOUNDFILE_FORMATS[audio_format]
    buffer = io.BytesIO()
    clipped = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0)
    sf.write(buffer, clipped, sample_rate, format=container, subtype=subtype)
    return buffer.getvalue()


def crossfade_join(
    parts: list[np.ndarray], sample_rate: int, crossfade_seconds: float
) -> np.ndarray:
    """Concatenate waveforms, overlapping neighbours with a linear crossfade to hide the seam.

    Each overlap is shortened to fit the shorter neighbour, so short parts never vanish.
    """
    if not parts:
        return np.zeros(0, dtype=np.float32)
    joined = np.asarray(parts[0], dtype=np.float32)
    fade = round(crossfade_seconds * sample_rate)
    for part in parts[1:]:
        joined = _crossfade_pair(joined, np.asarray(part, dtype=np.float32), fade)
    return joined


def _crossfade_pair(left: np.ndarray, right: np.ndarray, fade: int) -> np.ndarray:
    overlap = min(fade, len(left), len(right))
    if overlap == 0:
        return np.concatenate([left, right])
    ramp = np.linspace(0.0, 1.0, overlap, dtype=np.float32)
    mixed = left[-overlap:] * (1.0 - ramp) + right[:overlap] * ramp
    return np.concatenate([left[:-overlap], mixed, right[overlap:]])
