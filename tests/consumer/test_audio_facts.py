"""read_audio_facts: a plain WAV's header is parsed in Python, anything else by libsndfile;
both must say exactly what libsndfile says of the same bytes."""

import io
import struct
from collections.abc import Callable

import numpy as np
import pytest
import soundfile

from consumer.backends import GenerationFailed
from consumer.pipeline import AudioFacts, _plain_wav_facts, read_audio_facts


def _encode(frames: int, channels: int, rate: int, subtype: str, container: str = "WAV") -> bytes:
    buffer = io.BytesIO()
    samples = np.linspace(-0.5, 0.5, frames * channels, dtype=np.float32).reshape(-1, channels)
    soundfile.write(buffer, samples, rate, format=container, subtype=subtype)
    return buffer.getvalue()


def _libsndfile_facts(audio: bytes) -> AudioFacts:
    info = soundfile.info(io.BytesIO(audio))
    return AudioFacts(info.format, int(info.samplerate), float(info.duration))


def _with_chunk_before_fmt(wav: bytes, chunk: bytes, body: bytes) -> bytes:
    """`wav` with one more chunk right after the RIFF header (odd bodies get their pad byte)."""
    chunks = struct.pack("<4sI", chunk, len(body)) + body + b"\0" * (len(body) & 1) + wav[12:]
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks


def _with_data_size(wav: bytes, size: int) -> bytes:
    at = wav.index(b"data") + 4
    return wav[:at] + struct.pack("<I", size) + wav[at + 4 :]


@pytest.mark.parametrize("subtype", ["PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE"])
@pytest.mark.parametrize("channels", [1, 2, 6])
@pytest.mark.parametrize(("frames", "rate"), [(0, 24_000), (1, 8_000), (36_001, 44_100)])
def test_plain_wavs_are_read_in_python_as_libsndfile_reads_them(
    subtype: str, channels: int, frames: int, rate: int
) -> None:
    wav = _encode(frames, channels, rate, subtype)

    assert _plain_wav_facts(wav) is not None  # the fast path, not the fallback
    assert read_audio_facts(wav) == _libsndfile_facts(wav)


@pytest.mark.parametrize("body", [b"abc", b"odd-length junk!!", b""])
def test_chunks_before_fmt_are_skipped_with_their_padding(body: bytes) -> None:
    wav = _with_chunk_before_fmt(_encode(1000, 1, 24_000, "PCM_16"), b"junk", body)

    assert _plain_wav_facts(wav) is not None
    assert read_audio_facts(wav) == _libsndfile_facts(wav)


@pytest.mark.parametrize(
    ("container", "subtype"),
    [("WAVEX", "PCM_16"), ("WAV", "IMA_ADPCM"), ("FLAC", "PCM_16"), ("OGG", "VORBIS")],
)
def test_other_audio_goes_to_libsndfile(container: str, subtype: str) -> None:
    audio = _encode(4000, 1, 24_000, subtype, container)

    assert _plain_wav_facts(audio) is None
    assert read_audio_facts(audio) == _libsndfile_facts(audio)


@pytest.mark.parametrize(
    "damage",
    [
        lambda wav: wav[:-1001],  # cut short
        lambda wav: _with_data_size(wav, 0xFFFFFFFF),  # streamed: length unknown
        lambda wav: _with_data_size(wav, 1001),  # not whole frames
    ],
)
def test_wavs_whose_sizes_do_not_add_up_are_left_to_libsndfile(
    damage: Callable[[bytes], bytes],
) -> None:
    wav = damage(_encode(24_000, 1, 24_000, "PCM_16"))

    assert _plain_wav_facts(wav) is None
    assert read_audio_facts(wav) == _libsndfile_facts(wav)


@pytest.mark.parametrize("data", [b"", b"RIFF", b"RIFF\x10\0\0\0WAVEfmt ", b"not audio at all"])
def test_bytes_that_are_not_audio_fail_generation(data: bytes) -> None:
    with pytest.raises(GenerationFailed, match="not audio"):
        read_audio_facts(data)
