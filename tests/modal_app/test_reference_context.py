"""The decode of an ICL call: only the reference's last frames before the call's own, on the
tiny model on a CPU (`modal_app.reference_context`)."""

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the engine extra")
pytest.importorskip("qwen_tts", reason="needs the engine extra")

from qwen_tts import Qwen3TTSModel  # noqa: E402

from modal_app.engine import CloneInput, Engine  # noqa: E402
from modal_app.reference_context import REFERENCE_CONTEXT_FRAMES  # noqa: E402
from schemas.vocabulary import GenerationParams  # noqa: E402
from tests.fixtures.model import (  # noqa: E402
    REFERENCE_TRANSCRIPT,
    SAMPLE_RATE,
    SAMPLES_PER_FRAME,
    frames_to_samples,
    synthetic_voice,
)

pytestmark = pytest.mark.engine

FRAMES = 12  # max_new_tokens: 11 frames of the fixed-length tiny model
GREEDY = {"do_sample": False, "subtalker_dosample": False}


def decoded_frames(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The frames each speech-tokenizer decode is given, recorded as the engine decodes."""
    tokenizer = engine.tts.model.speech_tokenizer
    decode = tokenizer.decode
    frames: list[int] = []

    def recording(items: list[dict[str, Any]]) -> Any:
        frames.extend(len(item["audio_codes"]) for item in items)
        return decode(items)

    monkeypatch.setattr(tokenizer, "decode", recording)
    return frames


@pytest.mark.parametrize("seconds", [1.0, 10.0])  # 13 frames (all of it), 125 (its last 25)
def test_an_icl_call_decodes_only_the_last_frames_of_its_reference(
    engine: Engine,
    make_reference_wav: Callable[..., bytes],
    monkeypatch: pytest.MonkeyPatch,
    seconds: float,
) -> None:
    reference = make_reference_wav(60 + int(seconds), seconds=seconds)
    frames = decoded_frames(engine, monkeypatch)

    output = engine.clone(
        CloneInput(
            text="Hello there.",
            reference_audio=reference,
            reference_text=REFERENCE_TRANSCRIPT,
            params=GenerationParams(max_new_tokens=FRAMES),
        )
    )

    reference_frames = math.ceil(seconds * SAMPLE_RATE / SAMPLES_PER_FRAME)  # a part: a frame
    assert frames == [min(reference_frames, REFERENCE_CONTEXT_FRAMES) + FRAMES - 1]
    assert len(output.waveform) == frames_to_samples(FRAMES)  # cut by frame count, exactly


def test_an_x_vector_call_decodes_only_its_own_frames(
    engine: Engine, make_reference_wav: Callable[..., bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    frames = decoded_frames(engine, monkeypatch)

    output = engine.clone(
        CloneInput(
            text="Hello there.",
            reference_audio=make_reference_wav(70, seconds=10.0),
            params=GenerationParams(max_new_tokens=FRAMES),
        )
    )

    assert frames == [FRAMES - 1]
    assert len(output.waveform) == frames_to_samples(FRAMES)


def test_the_audio_is_close_to_qwen_tts_decoding_the_whole_reference(engine: Engine) -> None:
    prompt = engine.tts.create_voice_clone_prompt(
        ref_audio=(synthetic_voice(10.0, seed=71), SAMPLE_RATE), ref_text=REFERENCE_TRANSCRIPT
    )
    arguments = {
        "text": ["The quick brown fox jumps over the lazy dog."],
        "language": ["English"],
        "voice_clone_prompt": prompt,
        "max_new_tokens": 40,
        **GREEDY,  # the same codes both times
    }

    (bounded,), _ = engine.tts.generate_voice_clone(**arguments)
    (whole,), _ = Qwen3TTSModel.generate_voice_clone(engine.tts, **arguments)

    assert len(prompt[0].ref_code) == 125
    assert len(bounded) == len(whole) == frames_to_samples(40)
    error = bounded - whole
    snr_db = 10 * np.log10(np.sum(whole**2) / max(np.sum(error**2), 1e-30))
    # Measured on this model: about 1e-5 at most, 90 dB (rounding, not missing context).
    assert np.abs(error).max() < 1e-3
    assert snr_db > 60
