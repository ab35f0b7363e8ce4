"""The speech tokenizer decode with cached attention masks: qwen-tts's audio, bit for bit."""

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

torch = pytest.importorskip("torch", reason="needs the engine extra")
qwen_tokenizer = pytest.importorskip(
    "qwen_tts.core.tokenizer_12hz.modeling_qwen3_tts_tokenizer_v2", reason="needs the engine extra"
)

from tests.fixtures.model import load_plain_tts, random_codes  # noqa: E402

if TYPE_CHECKING:
    from modal_app.engine import Engine

# Code lengths (frames) around the decoder's 72-frame sliding window and past its 300-frame
# decode window (so a call runs in two windows); the last case is a batch of unequal lengths.
LENGTHS = [(1,), (5,), (72,), (73,), (100,), (420,), (50, 90)]


@pytest.fixture(scope="module")
def plain_tts(tiny_model_dir: Path) -> Any:
    return load_plain_tts(tiny_model_dir)


@pytest.mark.parametrize("lengths", LENGTHS)
def test_cached_masks_give_qwen_tts_own_audio_bit_for_bit(
    plain_tts: Any, lengths: tuple[int, ...]
) -> None:
    from modal_app.decode_masks import cache_decode_masks

    codes = random_codes(plain_tts, lengths, seed=sum(lengths))
    decode = plain_tts.model.speech_tokenizer.decode
    expected, rate = decode(codes)
    handle = cache_decode_masks(plain_tts)
    try:
        built, cached = decode(codes), decode(codes)  # the second is served from the cache
    finally:
        handle.remove()
    for waves in (built, cached):
        assert waves[1] == rate
        assert len(waves[0]) == len(expected)
        for got, want in zip(waves[0], expected, strict=True):
            assert got.dtype == want.dtype
            assert got.tobytes() == want.tobytes()


def test_the_engine_decode_builds_no_mask_for_a_length_it_has_seen(
    engine: "Engine", monkeypatch: pytest.MonkeyPatch
) -> None:
    builds: list[int] = []

    def counted(build: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(**kwargs: Any) -> Any:
            builds.append(kwargs["input_embeds"].shape[1])
            return build(**kwargs)

        return wrapper

    for name in ("create_causal_mask", "create_sliding_window_causal_mask"):
        monkeypatch.setattr(qwen_tokenizer, name, counted(getattr(qwen_tokenizer, name)))
    codes = random_codes(engine.tts, (60,), seed=1)
    decode = engine.tts.model.speech_tokenizer.decode
    first, _ = decode(codes)
    second, _ = decode(codes)
    assert builds == []
    assert first[0].tobytes() == second[0].tobytes()
