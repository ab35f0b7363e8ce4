"""The engine on the tiny model: the real qwen-tts load, prompt and generation code on a CPU."""

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

pytest.importorskip("qwen_tts", reason="needs the engine extra")

from modal_app.audio import DecodedAudio
from modal_app.engine import (
    BatchCloneInput,
    CloneInput,
    Engine,
    EngineOptions,
    pick_dtype,
)
from modal_app.languages import SUPPORTED_LANGUAGES
from modal_app.prompt_cache import PromptCache
from schemas.vocabulary import (
    AudioFormat,
    ErrorCode,
    GenerationFailed,
    GenerationParams,
    InvalidInput,
)
from tests.fixtures.model import (
    REFERENCE_TRANSCRIPT,
    SAMPLE_RATE,
    frames_to_samples,
    synthetic_voice,
    wav_bytes,
)

pytestmark = pytest.mark.engine

FRAMES = 6  # max_new_tokens per generation: 5 frames, 0.4 s of audio
SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank."
FADE_SAMPLES = round(EngineOptions().crossfade_seconds * SAMPLE_RATE)


def clone_input(reference: bytes | DecodedAudio, **overrides: Any) -> CloneInput:
    fields: dict[str, Any] = {
        "text": "Hello there.",
        "reference_audio": reference,
        "reference_text": REFERENCE_TRANSCRIPT,
        "params": GenerationParams(max_new_tokens=FRAMES),
    }
    return CloneInput(**(fields | overrides))


def test_one_text_gives_decodable_audio_of_the_generated_length(
    engine: Engine, reference_wav: bytes
) -> None:
    output = engine.clone(clone_input(reference_wav))

    assert output.audio_format is AudioFormat.WAV
    assert output.content_type == "audio/wav"
    assert output.sample_rate == SAMPLE_RATE
    assert output.waveform.dtype == np.float32
    assert len(output.waveform) == frames_to_samples(FRAMES)
    assert output.duration_seconds == pytest.approx(frames_to_samples(FRAMES) / SAMPLE_RATE)
    assert output.chunks == 1
    assert output.inference_seconds > 0
    assert np.std(output.waveform) > 0.01  # audible, not the silence of an uncalibrated codec
    decoded = DecodedAudio.from_bytes(output.audio)
    np.testing.assert_allclose(decoded.samples, np.clip(output.waveform, -1, 1), atol=1 / 32768)


def test_batch_gives_one_result_per_text_from_one_generate_call(
    engine: Engine, reference_wav: bytes, record_model_calls: Callable[..., Any]
) -> None:
    generate = record_model_calls(engine, "generate_voice_clone")
    texts = ["One.", "Two, three.", "Four five six."]

    result = engine.clone_batch(
        BatchCloneInput(
            texts=texts,
            languages=["English", "german", "Auto"],
            reference_audio=reference_wav,
            params=GenerationParams(max_new_tokens=FRAMES),
        )
    )

    assert [len(item.waveform) for item in result.items] == [frames_to_samples(FRAMES)] * 3
    assert len(generate.calls) == 1
    assert generate.calls[0]["text"] == texts
    assert generate.calls[0]["language"] == ["English", "German", "Auto"]
    assert not np.array_equal(result.items[0].waveform, result.items[1].waveform)
    assert all(item.inference_seconds == result.inference_seconds for item in result.items)


def test_long_text_is_chunked_generated_in_one_batch_and_crossfaded(
    engine: Engine, reference_wav: bytes, record_model_calls: Callable[..., Any]
) -> None:
    generate = record_model_calls(engine, "generate_voice_clone")
    text = " ".join([SENTENCE] * 7)  # 454 characters: three chunks at the 200-character limit

    output = engine.clone(clone_input(reference_wav, text=text))

    assert output.chunks == 3
    assert len(generate.calls) == 1
    chunks = generate.calls[0]["text"]
    assert len(chunks) == 3
    assert all(len(chunk) <= engine.options.chunk_chars for chunk in chunks)
    assert " ".join(chunks) == text
    assert len(output.waveform) == 3 * frames_to_samples(FRAMES) - 2 * FADE_SAMPLES


def test_chunks_past_the_batch_limit_run_in_several_calls_and_regroup_by_text(
    engine: Engine, reference_wav: bytes, record_model_calls: Callable[..., Any]
) -> None:
    small_batches = Engine(
        engine.tts,
        model_name=engine.model_name,
        attn_implementation=engine.attn_implementation,
        options=EngineOptions(chunk_chars=20, max_chunks_per_batch=2),
        load_seconds=0.0,
    )
    generate = record_model_calls(small_batches, "generate_voice_clone")

    result = small_batches.clone_batch(
        BatchCloneInput(
            texts=["Alpha one. Beta two. Gamma three.", "Delta four. Echo five."],
            reference_audio=reference_wav,
            params=GenerationParams(max_new_tokens=FRAMES),
        )
    )

    assert [len(call["text"]) for call in generate.calls] == [2, 2, 1]
    assert [item.chunks for item in result.items] == [3, 2]
    per_chunk = frames_to_samples(FRAMES)
    assert len(result.items[0].waveform) == 3 * per_chunk - 2 * FADE_SAMPLES
    assert len(result.items[1].waveform) == 2 * per_chunk - FADE_SAMPLES


@pytest.mark.parametrize("audio_format", list(AudioFormat))
def test_each_output_format_decodes_at_24_khz(
    engine: Engine, reference_wav: bytes, audio_format: AudioFormat
) -> None:
    output = engine.clone(clone_input(reference_wav, output_format=audio_format.value.lower()))

    decoded = DecodedAudio.from_bytes(output.audio)
    assert output.audio_format is audio_format
    assert decoded.sample_rate == SAMPLE_RATE
    assert decoded.duration_seconds == pytest.approx(output.duration_seconds, abs=0.06)


def test_a_transcript_selects_in_context_cloning(
    engine: Engine,
    make_reference_wav: Callable[..., bytes],
    record_model_calls: Callable[..., Any],
) -> None:
    make_prompt = record_model_calls(engine, "create_voice_clone_prompt")

    output = engine.clone(clone_input(make_reference_wav(21), reference_text="Some words."))

    (prompt,) = make_prompt.results[0]
    assert prompt.icl_mode
    assert prompt.ref_code is not None
    assert prompt.ref_text == "Some words."
    assert len(output.waveform) == frames_to_samples(FRAMES)  # the reference part is cut off


@pytest.mark.parametrize(("transcript", "voice_seed"), [(None, 22), ("", 23), ("   ", 24)])
def test_no_transcript_selects_x_vector_only_cloning(
    engine: Engine,
    make_reference_wav: Callable[..., bytes],
    record_model_calls: Callable[..., Any],
    transcript: str | None,
    voice_seed: int,
) -> None:
    make_prompt = record_model_calls(engine, "create_voice_clone_prompt")

    output = engine.clone(clone_input(make_reference_wav(voice_seed), reference_text=transcript))

    (prompt,) = make_prompt.results[0]
    assert prompt.x_vector_only_mode
    assert prompt.ref_code is None
    assert len(output.waveform) == frames_to_samples(FRAMES)


def test_the_same_voice_reuses_its_prompt(
    engine: Engine,
    make_reference_wav: Callable[..., bytes],
    record_model_calls: Callable[..., Any],
) -> None:
    make_prompt = record_model_calls(engine, "create_voice_clone_prompt")
    voice = make_reference_wav(25)

    first = engine.clone(clone_input(voice))
    second = engine.clone(clone_input(voice, text="Something else entirely."))
    other_transcript = engine.clone(clone_input(voice, reference_text="Different words."))

    assert [first.prompt_cache_hit, second.prompt_cache_hit] == [False, True]
    assert not other_transcript.prompt_cache_hit
    assert len(make_prompt.calls) == 2


def test_prompt_cache_evicts_the_least_recently_used_voice() -> None:
    cache = PromptCache(capacity=2)
    first, second, third = object(), object(), object()
    cache.put(("a", None), first)  # type: ignore[arg-type]
    cache.put(("b", None), second)  # type: ignore[arg-type]
    cache.get(("a", None))
    cache.put(("c", "text"), third)  # type: ignore[arg-type]

    assert len(cache) == 2
    assert cache.get(("a", None)) is first
    assert cache.get(("b", None)) is None
    assert cache.get(("c", "text")) is third


def test_a_zero_capacity_cache_keeps_nothing() -> None:
    cache = PromptCache(capacity=0)
    cache.put(("a", None), object())  # type: ignore[arg-type]

    assert len(cache) == 0


def test_unsupported_language_is_a_clear_error(
    engine: Engine, reference_wav: bytes, record_model_calls: Callable[..., Any]
) -> None:
    generate = record_model_calls(engine, "generate_voice_clone")

    with pytest.raises(InvalidInput) as caught:
        engine.clone(clone_input(reference_wav, language="Klingon"))

    assert str(caught.value) == (
        "Unsupported language: Klingon. Supported: Auto, Chinese, English, Japanese, Korean, "
        "German, French, Russian, Portuguese, Spanish, Italian"
    )
    assert generate.calls == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"text": "   "}, r"^'text' is required$"),
        (
            {"text": "x" * 50_001},
            r"^Text too long: 'text' has 50001 characters; the limit is 50000$",
        ),
        ({"reference_audio": b"not audio" * 20}, r"^Could not decode reference audio"),
        ({"reference_audio": "a path"}, r"^Reference audio must be bytes or DecodedAudio$"),
        (
            {"reference_audio": wav_bytes(np.zeros(2400, dtype=np.float32))},
            r"^Reference audio lasts 0\.10 s; it must last between 0\.5 and 60 s$",
        ),
        ({"output_format": "aac"}, r"^Unsupported output format: aac"),
    ],
)
def test_bad_requests_fail_before_generating(
    engine: Engine,
    reference_wav: bytes,
    record_model_calls: Callable[..., Any],
    overrides: dict[str, Any],
    message: str,
) -> None:
    generate = record_model_calls(engine, "generate_voice_clone")

    with pytest.raises(InvalidInput, match=message):
        engine.clone(clone_input(reference_wav, **overrides))

    assert generate.calls == []


def test_a_text_too_long_is_refused_with_its_error_code(
    engine: Engine, reference_wav: bytes
) -> None:
    with pytest.raises(InvalidInput) as caught:
        engine.clone(clone_input(reference_wav, text="x" * 50_001))

    assert caught.value.code == ErrorCode.TEXT_TOO_LONG


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ({"texts": []}, r"^'texts' must be a non-empty list$"),
        ({"texts": ["a"] * 65}, r"^'texts' has 65 entries; the limit is 64$"),
        ({"texts": ["a", " "]}, r"^'texts\[1\]' is required$"),
        ({"texts": ["a", "b", "c"], "languages": ["English", "German"]}, "has 2 entries for 3"),
    ],
)
def test_bad_batches_are_rejected(
    engine: Engine, reference_wav: bytes, batch: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidInput, match=message):
        engine.clone_batch(BatchCloneInput(reference_audio=reference_wav, **batch))


def test_a_seed_makes_generation_repeatable(engine: Engine, reference_wav: bytes) -> None:
    def speak(seed: int) -> np.ndarray:
        params = GenerationParams(max_new_tokens=FRAMES, seed=seed)
        return engine.clone(clone_input(reference_wav, params=params)).waveform

    np.testing.assert_array_equal(speak(7), speak(7))
    assert not np.array_equal(speak(7), speak(8))


@pytest.mark.parametrize("sample_rate", [16_000, 48_000])
def test_references_at_other_rates_are_resampled(
    engine: Engine, make_reference_wav: Callable[..., bytes], sample_rate: int
) -> None:
    voice = make_reference_wav(30 + sample_rate // 1000, sample_rate=sample_rate)

    output = engine.clone(clone_input(voice))

    assert len(output.waveform) == frames_to_samples(FRAMES)


def test_decoded_samples_work_as_a_reference(engine: Engine) -> None:
    voice = DecodedAudio(samples=synthetic_voice(seed=41), sample_rate=SAMPLE_RATE)

    first = engine.clone(clone_input(voice, reference_text=None))
    second = engine.clone(clone_input(voice, reference_text=None))

    assert len(first.waveform) == frames_to_samples(FRAMES)
    assert second.prompt_cache_hit


def test_model_errors_become_generation_failed(
    engine: Engine, reference_wav: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    def out_of_memory(**_kwargs: Any) -> None:
        raise RuntimeError("CUDA out of memory")

    with monkeypatch.context() as patch:
        patch.setattr(engine.tts, "generate_voice_clone", out_of_memory)
        with pytest.raises(GenerationFailed, match=r"^Generation failed: CUDA out of memory$"):
            engine.clone(clone_input(reference_wav))

    assert len(engine.clone(clone_input(reference_wav)).waveform) > 0  # the lock was released


def test_describe_reports_the_loaded_model(engine: Engine, tiny_model_dir: Any) -> None:
    info = engine.describe()

    assert info.model == str(tiny_model_dir)
    assert (info.device, info.dtype, info.gpu) == ("cpu", "float32", None)
    assert info.attention_implementation == "sdpa"
    assert info.languages == list(SUPPORTED_LANGUAGES)
    assert engine.load_seconds > 0


def test_moving_the_model_keeps_it_working_and_drops_cached_prompts(
    engine: Engine, make_reference_wav: Callable[..., bytes]
) -> None:
    voice = make_reference_wav(50)
    engine.clone(clone_input(voice))

    engine.to("cpu", "float32")
    output = engine.clone(clone_input(voice))

    assert not output.prompt_cache_hit
    assert len(output.waveform) == frames_to_samples(FRAMES)


def test_warm_up_runs_a_generation(engine: Engine, record_model_calls: Callable[..., Any]) -> None:
    generate = record_model_calls(engine, "generate_voice_clone")

    engine.warm_up()

    assert len(generate.calls) == 1


@pytest.mark.parametrize(
    ("device", "requested", "expected"),
    [("cpu", None, "float32"), ("cpu", "bf16", "bfloat16"), ("cuda:0", "float16", "float16")],
)
def test_dtype_choice(device: str, requested: str | None, expected: str) -> None:
    assert str(pick_dtype(device, requested)) == f"torch.{expected}"


def test_unknown_dtype_is_refused() -> None:
    with pytest.raises(ValueError, match="Unknown dtype 'int4'"):
        pick_dtype("cpu", "int4")
