import io

import numpy as np
import pytest
import soundfile as sf

from modal_app.audio import DecodedAudio, crossfade_join, encode_audio
from schemas.vocabulary import AudioFormat, InvalidInput
from tests.fixtures.model import SAMPLE_RATE, synthetic_voice, wav_bytes

ONE_LSB = 1 / 32768


@pytest.mark.parametrize("audio_format", [AudioFormat.WAV, AudioFormat.FLAC])
def test_lossless_formats_round_trip_to_16_bit_precision(audio_format: AudioFormat) -> None:
    samples = synthetic_voice(seconds=0.5)

    decoded = DecodedAudio.from_bytes(encode_audio(samples, SAMPLE_RATE, audio_format))

    assert decoded.sample_rate == SAMPLE_RATE
    np.testing.assert_allclose(decoded.samples, samples, atol=ONE_LSB)


@pytest.mark.parametrize("audio_format", [AudioFormat.OGG_OPUS, AudioFormat.MP3])
def test_lossy_formats_keep_rate_duration_and_level(audio_format: AudioFormat) -> None:
    samples = synthetic_voice(seconds=1.0)

    data = encode_audio(samples, SAMPLE_RATE, audio_format)
    decoded = DecodedAudio.from_bytes(data)

    assert sf.info(io.BytesIO(data)).format == (
        "OGG" if audio_format is AudioFormat.OGG_OPUS else "MP3"
    )
    assert decoded.sample_rate == SAMPLE_RATE
    assert decoded.duration_seconds == pytest.approx(1.0, abs=0.06)
    assert np.std(decoded.samples) == pytest.approx(np.std(samples), rel=0.25)


def test_encoding_clips_instead_of_wrapping() -> None:
    loud = np.array([2.0, -2.0, 0.5], dtype=np.float32)

    decoded = DecodedAudio.from_bytes(encode_audio(loud, SAMPLE_RATE, AudioFormat.WAV))

    np.testing.assert_allclose(decoded.samples, [1.0, -1.0, 0.5], atol=2 * ONE_LSB)


def test_opus_refuses_rates_it_cannot_encode() -> None:
    with pytest.raises(ValueError, match="44100 Hz"):
        encode_audio(np.zeros(100, dtype=np.float32), 44_100, AudioFormat.OGG_OPUS)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("wav", AudioFormat.WAV),
        ("FLAC", AudioFormat.FLAC),
        ("OGG_OPUS", AudioFormat.OGG_OPUS),
        ("ogg", AudioFormat.OGG_OPUS),
        ("opus", AudioFormat.OGG_OPUS),
        (" mp3 ", AudioFormat.MP3),
        (AudioFormat.MP3, AudioFormat.MP3),
    ],
)
def test_format_names_parse_case_insensitively(name: str, expected: AudioFormat) -> None:
    assert AudioFormat.parse(name) is expected


def test_unknown_format_names_the_supported_ones() -> None:
    with pytest.raises(
        InvalidInput,
        match=r"^Unsupported output format: aac\. Supported: WAV, FLAC, OGG_OPUS, MP3$",
    ):
        AudioFormat.parse("aac")


def test_formats_carry_http_content_types_and_extensions() -> None:
    assert {fmt.content_type for fmt in AudioFormat} == {
        "audio/wav",
        "audio/flac",
        "audio/ogg",
        "audio/mpeg",
    }
    assert AudioFormat.OGG_OPUS.extension == "ogg"


def test_decoding_mixes_channels_down_to_mono() -> None:
    left = np.full(1000, 0.5, dtype=np.float32)
    right = np.full(1000, -0.25, dtype=np.float32)
    buffer = io.BytesIO()
    sf.write(buffer, np.stack([left, right], axis=1), 16_000, format="FLAC")

    decoded = DecodedAudio.from_bytes(buffer.getvalue())

    assert decoded.sample_rate == 16_000
    assert decoded.samples.ndim == 1
    np.testing.assert_allclose(decoded.samples, 0.125, atol=ONE_LSB)


@pytest.mark.parametrize(
    ("data", "message"),
    [(b"", "empty"), (b"not audio at all" * 10, "Could not decode reference audio")],
)
def test_undecodable_audio_is_invalid_input(data: bytes, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        DecodedAudio.from_bytes(data)


def test_decoded_audio_reports_its_duration() -> None:
    decoded = DecodedAudio.from_bytes(wav_bytes(np.zeros(36_000, dtype=np.float32)))

    assert decoded.duration_seconds == pytest.approx(1.5)


def test_crossfade_overlaps_neighbours_with_a_linear_ramp() -> None:
    left = np.ones(1000, dtype=np.float32)
    right = -np.ones(1000, dtype=np.float32)

    joined = crossfade_join([left, right], sample_rate=1000, crossfade_seconds=0.1)

    assert len(joined) == 1900
    np.testing.assert_array_equal(joined[:900], 1.0)
    np.testing.assert_array_equal(joined[1000:], -1.0)
    seam = joined[900:1000]
    assert seam[0] == pytest.approx(1.0)
    assert seam[-1] == pytest.approx(-1.0)
    assert np.all(np.diff(seam) < 0)


def test_crossfade_never_overlaps_more_than_the_shorter_part() -> None:
    joined = crossfade_join(
        [np.ones(500, dtype=np.float32), np.ones(30, dtype=np.float32)],
        sample_rate=1000,
        crossfade_seconds=0.1,
    )

    assert len(joined) == 500


def test_crossfade_of_one_part_or_none() -> None:
    part = synthetic_voice(seconds=0.1)

    np.testing.assert_array_equal(crossfade_join([part], SAMPLE_RATE, 0.03), part)
    assert len(crossfade_join([], SAMPLE_RATE, 0.03)) == 0
