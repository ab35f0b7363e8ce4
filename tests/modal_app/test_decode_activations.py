"""The speech tokenizer decode's SnakeBeta activations with cached parameter transforms:
qwen-tts's audio, bit for bit, with no per-call work on the parameters."""

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

torch = pytest.importorskip("torch", reason="needs the engine extra")
qwen_tokenizer = pytest.importorskip(
    "qwen_tts.core.tokenizer_12hz.modeling_qwen3_tts_tokenizer_v2", reason="needs the engine extra"
)

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from modal_app.decode_activations import cache_snake_parameters  # noqa: E402
from tests.fixtures.model import load_plain_tts, random_codes  # noqa: E402

if TYPE_CHECKING:
    from modal_app.engine import Engine

SnakeBeta = qwen_tokenizer.SnakeBeta


@pytest.fixture(scope="module")
def cached_tts(tiny_model_dir: Path) -> Any:
    """A model of its own: the cache stays installed on it."""
    return load_plain_tts(tiny_model_dir)


class CountedOps(TorchDispatchMode):
    """Counts the aten operators run within."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("lengths", [(1,), (31,), (73,), (50, 90)])
def test_cached_activations_give_qwen_tts_own_audio_bit_for_bit(
    tiny_model_dir: Path, lengths: tuple[int, ...]
) -> None:
    tts = load_plain_tts(tiny_model_dir)
    codes = random_codes(tts, lengths, seed=sum(lengths))
    decode = tts.model.speech_tokenizer.decode
    expected, _ = decode(codes)

    assert cache_snake_parameters(tts) > 0
    for waves, _ in (decode(codes), decode(codes)):  # the second from the cache
        for got, want in zip(waves, expected, strict=True):
            assert got.tobytes() == want.tobytes()


def test_changed_weights_are_seen(cached_tts: Any) -> None:
    cache_snake_parameters(cached_tts)
    snake = next(
        module
        for module in cached_tts.model.speech_tokenizer.model.modules()
        if isinstance(module, SnakeBeta)
    )
    hidden = torch.randn(1, snake.alpha.shape[0], 50, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        snake(hidden)  # fills the cache
    with torch.no_grad():
        snake.alpha.add_(0.5)
        snake.beta.sub_(0.25)

    with torch.inference_mode():
        assert torch.equal(snake(hidden), SnakeBeta.forward(snake, hidden))


def test_the_engine_decode_computes_nothing_from_the_parameters_per_call(
    engine: "Engine",
) -> None:
    codes = random_codes(engine.tts, (31,), seed=2)
    decode = engine.tts.model.speech_tokenizer.decode
    decode(codes)
    with CountedOps() as ops:
        decode(codes)

    snakes = [
        m for m in engine.tts.model.speech_tokenizer.model.modules() if isinstance(m, SnakeBeta)
    ]
    assert ops.names.count("sin") + ops.names.count("sin_") > len(snakes) > 0  # and rotary
    assert "exp" not in ops.names  # exp(alpha), exp(beta): twice per SnakeBeta, uncached
