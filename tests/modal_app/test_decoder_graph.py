"""The speech decoder's traced graph: qwen-tts's audio bit for bit, no Python per module while it
decodes, and the eager decoder whenever the graph would differ."""

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="needs the engine extra")
qwen_tokenizer = pytest.importorskip(
    "qwen_tts.core.tokenizer_12hz.modeling_qwen3_tts_tokenizer_v2", reason="needs the engine extra"
)

from modal_app import decoder_graph  # noqa: E402
from modal_app.decoder_graph import install_decoder_graph, remove_decoder_graph  # noqa: E402
from modal_app.engine import Engine, EngineOptions  # noqa: E402
from tests.fixtures.model import load_plain_tts, random_codes  # noqa: E402

# Around the 72-frame sliding window, past the 300-frame decode window (two windows), and a
# batch of unequal lengths (padded by qwen-tts).
LENGTHS = [(1,), (33,), (72,), (73,), (420,), (50, 90)]


@pytest.fixture(scope="module")
def eager_tts(tiny_model_dir: Path) -> Any:
    return load_plain_tts(tiny_model_dir)


@pytest.fixture(scope="module")
def graph_tts(tiny_model_dir: Path) -> Any:
    tts = load_plain_tts(tiny_model_dir)
    assert install_decoder_graph(tts)
    return tts


def snake_calls(tts: Any) -> list[None]:
    """A list that grows by one each time a SnakeBeta module's Python forward runs."""
    calls: list[None] = []
    for module in tts.model.speech_tokenizer.model.modules():
        if isinstance(module, qwen_tokenizer.SnakeBeta):
            module.register_forward_hook(lambda *_: calls.append(None))
    return calls


@pytest.mark.parametrize("lengths", LENGTHS)
def test_the_graph_decodes_qwen_tts_own_audio_bit_for_bit(
    eager_tts: Any, graph_tts: Any, lengths: tuple[int, ...]
) -> None:
    codes = random_codes(eager_tts, lengths, seed=sum(lengths))

    expected, rate = eager_tts.model.speech_tokenizer.decode(codes)
    waves, graph_rate = graph_tts.model.speech_tokenizer.decode(codes)

    assert graph_rate == rate
    assert len(waves) == len(expected)
    for got, want in zip(waves, expected, strict=True):
        assert got.dtype == want.dtype
        assert got.tobytes() == want.tobytes()


def test_a_decode_through_the_graph_runs_no_module_in_python(tiny_model_dir: Path) -> None:
    tts = load_plain_tts(tiny_model_dir)
    calls = snake_calls(tts)
    codes = random_codes(tts, (40,), seed=3)

    tts.model.speech_tokenizer.decode(codes)
    eager = len(calls)
    assert install_decoder_graph(tts)  # checks the graph against eager decodes
    calls.clear()
    tts.model.speech_tokenizer.decode(codes)

    assert eager > 0
    assert calls == []


def test_a_graph_that_differs_from_the_eager_decoder_is_not_used(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tts = load_plain_tts(tiny_model_dir)
    calls = snake_calls(tts)

    def off_by_a_little(self: Any, hidden: Any) -> Any:  # what a wrongly recorded padding does
        return self.conv(torch.nn.functional.pad(hidden, (self.padding, 0))).contiguous() * 1.0001

    monkeypatch.setattr(decoder_graph, "_left_padded", off_by_a_little)

    assert not install_decoder_graph(tts)
    tts.model.speech_tokenizer.decode(random_codes(tts, (10,), seed=4))
    assert calls != []  # the eager decoder served


def test_the_engine_traces_at_warm_up_and_drops_the_graph_when_it_moves(
    tiny_model_dir: Path,
) -> None:
    engine = Engine.load(tiny_model_dir, device="cpu", options=EngineOptions())
    decoder = engine.tts.model.speech_tokenizer.model.decoder
    assert not engine.decoder_traced

    engine.warm_up()
    assert engine.decoder_traced
    assert "forward" in decoder.__dict__

    engine.to("cpu")
    assert not engine.decoder_traced
    assert "forward" not in decoder.__dict__
    remove_decoder_graph(engine.tts)  # twice is harmless


def test_the_option_keeps_the_decoder_eager(tiny_model_dir: Path) -> None:
    engine = Engine.load(tiny_model_dir, device="cpu", options=EngineOptions(trace_decoder=False))

    engine.warm_up()

    assert not engine.decoder_traced
    assert "forward" not in engine.tts.model.speech_tokenizer.model.decoder.__dict__
