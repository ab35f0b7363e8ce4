"""Facts about audio bytes a backend returned, read from their header."""

import io
import struct
from dataclasses import dataclass

import soundfile

from consumer.backends.errors import GenerationFailed

_RIFF_HEADER = struct.Struct("<4sI4s")
_CHUNK_HEADER = struct.Struct("<4sI")
_FMT = struct.Struct("<HHIIHH")  # format tag, channels, rate, byte rate, block align, bits
# Plain PCM and IEEE float WAVs, the ones libsndfile reports as "WAV" (the extensible
# format is "WAVEX"), at the sample widths it writes.
_PLAIN_WAV_BITS = {1: frozenset({8, 16, 24, 32}), 3: frozenset({32, 64})}


@dataclass(frozen=True)
class AudioFacts:
    format: str  # in the worker's vocabulary: "WAV", "FLAC", "OGG_OPUS", "MP3", ...
    sample_rate: int
    duration_seconds: float


def read_audio_facts(audio: bytes) -> AudioFacts:
    """Format, sample rate and duration of `audio`; `GenerationFailed` if it is not audio.

    Reads only the header, so it is cheap enough to run on the event loop. A plain WAV's
    header is parsed here: libsndfile would read it through Python callbacks, each of which
    gives up and takes back the GIL, and the event loop then waits behind every thread that
    wants it (profiled at a fifth of the worker's time). Anything else goes to libsndfile.
    """
    facts = _plain_wav_facts(audio)
    return facts if facts is not None else _soundfile_facts(audio)


def _soundfile_facts(audio: bytes) -> AudioFacts:
    try:
        info = soundfile.info(io.BytesIO(audio))
    except soundfile.SoundFileError as exc:
        raise GenerationFailed(
            f"the backend returned {len(audio)} bytes that are not audio"
        ) from exc
    audio_format = "OGG_OPUS" if (info.format, info.subtype) == ("OGG", "OPUS") else info.format
    return AudioFacts(audio_format, int(info.samplerate), float(info.duration))


def _plain_wav_facts(audio: bytes) -> AudioFacts | None:
    """The facts of a well-formed PCM or float RIFF/WAVE file; None for anything else
    (other formats, extensible or compressed WAVs, sizes that do not add up)."""
    if len(audio) < _RIFF_HEADER.size:
        return None
    riff, _, wave = _RIFF_HEADER.unpack_from(audio)
    if riff != b"RIFF" or wave != b"WAVE":
        return None
    fmt: tuple[int, ...] | None = None
    offset = _RIFF_HEADER.size
    while offset + _CHUNK_HEADER.size <= len(audio):
        chunk, size = _CHUNK_HEADER.unpack_from(audio, offset)
        body = offset + _CHUNK_HEADER.size
        if chunk == b"fmt " and size >= _FMT.size and body + size <= len(audio):
            fmt = _FMT.unpack_from(audio, body)
        elif chunk == b"data":
            fits = body + size <= len(audio)
            return _facts_from(fmt, size) if fits else None
        offset = body + size + (size & 1)  # chunks are padded to an even length
    return None


def _facts_from(fmt: tuple[int, ...] | None, data_bytes: int) -> AudioFacts | None:
    if fmt is None:
        return None
    tag, channels, rate, _, block_align, bits = fmt
    plain = bits in _PLAIN_WAV_BITS.get(tag, ()) and channels > 0 and rate > 0
    if not plain or block_align != channels * bits // 8 or data_bytes % block_align:
        return None
    return AudioFacts("WAV", rate, data_bytes // block_align / rate)
