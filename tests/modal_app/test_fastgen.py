"""The fast generation loop against qwen-tts's stock loop, on the tiny model on a CPU.

Greedy decoding makes both loops deterministic, so their codes must agree exactly: through
qwen-tts's own `generate_voice_clone` (its prompt building, in both prompt modes) and, for rows
that stop at different frames, at the talker's `generate` itself.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the engine extra")
pytest.importorskip("qwen_tts", reason="needs the engine extra")

from modal_app.engine import BatchCloneInput, CloneInput, Engine, EngineOptions  # noqa: E402
from modal_app.fastgen import (  # noqa: E402
    FastTalker,
    RowOptions,
    batch_bucket,
    stock_talker_kwargs,
)
from modal_app.synthetic import CODE_GROUPS, CODEBOOK_SIZE  # noqa: E402
from schemas.vocabulary import GenerationParams  # noqa: E402
from tests.fixtures.model import (  # noqa: E402
    REFERENCE_TRANSCRIPT,
    SAMPLE_RATE,
    frames_to_samples,
    synthetic_voice,
)

pytestmark = pytest.mark.engine

GREEDY = {"do_sample": False, "subtalker_dosample": False}
TEXTS = ["Hello.", "The quick brown fox jumps over the lazy dog.", "Again and again!"]


@pytest.fixture(scope="module")
def fast_engine(tiny_model_dir: Path) -> Engine:
    return Engine.load(tiny_model_dir, options=EngineOptions(generation="fast"))


@contextmanager
def recorded_codes(engine: Engine) -> Iterator[list[list[Any]]]:
    """Each `model.generate` call's per-row codes (what qwen-tts decodes into audio)."""
    model = engine.tts.model
    real = type(model).generate.__get__(model)
    calls: list[list[Any]] = []

    def record(**kwargs: Any) -> Any:
        codes, hidden = real(**kwargs)
        calls.append(codes)
        return codes, hidden

    model.generate = record
    try:
        yield calls
    finally:
        del model.generate


def stock_and_fast_codes(engine: Engine, **kwargs: Any) -> tuple[list[Any], list[Any]]:
    """The codes of the same `generate_voice_clone` call through both loops."""
    fast = FastTalker(engine.tts.model.talker)
    with recorded_codes(engine) as calls:
        engine.tts.generate_voice_clone(**kwargs)
        with fast.installed():
            engine.tts.generate_voice_clone(**kwargs)
    return calls[0], calls[1]


def voice_prompt(engine: Engine, icl: bool) -> Any:
    return engine.tts.create_voice_clone_prompt(
        ref_audio=(synthetic_voice(), SAMPLE_RATE),
        ref_text=REFERENCE_TRANSCRIPT if icl else None,
        x_vector_only_mode=not icl,
    )[0]


def assert_same_codes(stock: list[Any], fast: list[Any]) -> None:
    assert [tuple(codes.shape) for codes in fast] == [tuple(codes.shape) for codes in stock]
    for stock_codes, fast_codes in zip(stock, fast, strict=True):
        assert torch.equal(stock_codes, fast_codes)


@pytest.mark.parametrize("icl", [True, False], ids=["icl", "x-vector-only"])
def test_one_text_gives_the_stock_codes(engine: Engine, icl: bool) -> None:
    stock, fast = stock_and_fast_codes(
        engine,
        text="Hello there, how are you?",
        language="English",
        voice_clone_prompt=[voice_prompt(engine, icl)],
        max_new_tokens=12,
        **GREEDY,
    )

    assert_same_codes(stock, fast)
    assert fast[0].shape == (11, CODE_GROUPS)


@pytest.mark.parametrize("icl", [True, False], ids=["icl", "x-vector-only"])
def test_a_batch_of_differently_long_prompts_gives_the_stock_codes(
    engine: Engine, icl: bool
) -> None:
    prompt = voice_prompt(engine, icl)
    stock, fast = stock_and_fast_codes(
        engine,
        text=TEXTS,
        language=["English", "German", "Auto"],
        voice_clone_prompt=[prompt] * len(TEXTS),
        max_new_tokens=9,
        **GREEDY,
    )

    assert_same_codes(stock, fast)
    assert len(fast) == len(TEXTS)


def talker_inputs(talker: Any, lengths: list[int], seed: int) -> dict[str, Any]:
    """What qwen-tts hands the talker: left-padded prompt embeddings, their mask, the text
    still to be read, and the pad embedding. Random, so rows behave differently."""
    generator = torch.Generator().manual_seed(seed)
    width, longest = talker.config.hidden_size, max(lengths)
    embeds = torch.randn(len(lengths), longest, width, generator=generator)
    mask = torch.zeros(len(lengths), longest, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, longest - length :] = 1
        embeds[row, : longest - length] = 0
    return {
        "inputs_embeds": embeds,
        "attention_mask": mask,
        "trailing_text_hidden": torch.randn(len(lengths), 5, width, generator=generator),
        "tts_pad_embed": torch.randn(1, 1, width, generator=generator),
    }


def cut_at_end(codes: Any, eos: int) -> list[Any]:
    """Each row up to its first end token, as qwen-tts cuts the talker's output."""
    rows = []
    for row in codes:
        stops = torch.nonzero(row[:, 0] == eos)
        rows.append(row[: int(stops[0, 0])] if len(stops) else row)
    return rows


def ending_rows_codes(
    talker: Any, monkeypatch: pytest.MonkeyPatch, check_every: int = 8
) -> tuple[list[Any], list[Any]]:
    """Stock and fast codes, cut at the end token, for six rows that end at different frames.

    The test model never ends; a small bias towards the end token makes these rows end between
    2 and 7 frames (of at most 39), found by trying biases on these inputs."""
    eos = talker.config.codec_eos_token_id
    monkeypatch.setattr(talker.generation_config, "sequence_bias", [[[eos], 0.15]])
    inputs = talker_inputs(talker, [12, 7, 10, 5, 12, 9], seed=1)
    kwargs = stock_talker_kwargs(talker.config, 40, **GREEDY)
    result = talker.generate(**inputs, **kwargs)
    stock = torch.stack([step[-1] for step in result.hidden_states[1:]], dim=1)
    fast = FastTalker(talker, check_every=check_every).generate(**inputs, **kwargs)
    return cut_at_end(stock, eos), cut_at_end(fast, eos)


@pytest.mark.parametrize("check_every", [1, 3])
def test_rows_that_stop_at_different_frames_give_the_stock_codes(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, check_every: int
) -> None:
    stock, fast = ending_rows_codes(engine.tts.model.talker, monkeypatch, check_every)

    assert_same_codes(stock, fast)
    lengths = [len(codes) for codes in fast]
    assert len(set(lengths)) >= 3
    assert max(lengths) < 39
    # Enough rows end early for the live ones to move into a smaller batch bucket.
    assert sum(length < max(lengths) for length in lengths) >= 6 - batch_bucket(6) // 2


def test_eager_attention_gives_the_stock_codes_too(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    talker = Engine.load(tiny_model_dir, attn_implementation="eager").tts.model.talker

    assert_same_codes(*ending_rows_codes(talker, monkeypatch))


def test_attention_lengths_that_grow_during_generation_give_the_same_codes(
    engine: Engine,
) -> None:
    talker = engine.tts.model.talker
    inputs = talker_inputs(talker, [9, 4, 7], seed=3)
    kwargs = stock_talker_kwargs(talker.config, 30, **GREEDY)

    roomy = FastTalker(talker).generate(**inputs, **kwargs)
    # 16-position attention buckets: the steps attend over 16, then 32, then 48 positions.
    small = FastTalker(talker, kv_step=16, max_positions=48, check_every=4)
    grown = small.generate(**inputs, **kwargs)

    assert roomy.shape == (3, 29, CODE_GROUPS)
    assert torch.equal(grown, roomy)
    assert small._workspace.positions == 48  # allocated once, at its maximum


def test_sampling_is_repeatable_under_a_seed_and_stays_in_range(engine: Engine) -> None:
    talker = engine.tts.model.talker
    inputs = talker_inputs(talker, [8, 6, 8], seed=2)
    kwargs = stock_talker_kwargs(talker.config, 10, top_k=20, top_p=0.9)
    fast = FastTalker(talker)

    def sample(seed: int) -> Any:
        return fast.generate(**inputs, **kwargs, options=RowOptions(seeds=[seed, seed + 1, 7]))

    first, again, other = sample(5), sample(5), sample(6)

    assert first.shape == (3, 9, CODE_GROUPS)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    # The end token is masked in the test model and control tokens are suppressed.
    assert int(first.min()) >= 0
    assert int(first.max()) < CODEBOOK_SIZE


def test_the_fast_engine_returns_audio_of_the_generated_length(
    fast_engine: Engine, reference_wav: bytes
) -> None:
    fast_engine.warm_up()  # qwen-tts's x-vector-only path through the fast loop
    frames = 7
    output = fast_engine.clone(
        CloneInput(
            text="Hello there.",
            reference_audio=reference_wav,
            reference_text=REFERENCE_TRANSCRIPT,
            params=GenerationParams(max_new_tokens=frames, seed=3),
        )
    )

    assert len(output.waveform) == frames_to_samples(frames)
    assert output.waveform.dtype == np.float32
    assert np.isfinite(output.waveform).all()
    assert np.std(output.waveform) > 0.01


def test_the_fast_engine_batches_texts_and_repeats_under_a_seed(
    fast_engine: Engine, reference_wav: bytes
) -> None:
    def run() -> list[Any]:
        result = fast_engine.clone_batch(
            BatchCloneInput(
                texts=TEXTS,
                reference_audio=reference_wav,
                params=GenerationParams(max_new_tokens=5, seed=11),
            )
        )
        return [item.waveform for item in result.items]

    first, again = run(), run()

    assert [len(wave) for wave in first] == [frames_to_samples(5)] * len(TEXTS)
    for wave, repeat in zip(first, again, strict=True):
        np.testing.assert_array_equal(wave, repeat)


def test_resetting_the_generation_state_drops_the_buffers_and_keeps_working(
    fast_engine: Engine, reference_wav: bytes
) -> None:
    request = CloneInput(
        text="Hi.", reference_audio=reference_wav, params=GenerationParams(max_new_tokens=3)
    )
    fast_engine.clone(request)
    assert fast_engine._fast is not None
    before = fast_engine._fast._workspace

    fast_engine.reset_generation_state()

    assert fast_engine._fast._workspace is not before
    assert len(fast_engine.clone(request).waveform) == frames_to_samples(3)


def test_an_unknown_generation_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="generation must be one of stock, fast"):
        EngineOptions(generation="turbo")


def test_arguments_the_fast_loop_does_not_implement_are_refused(engine: Engine) -> None:
    talker = engine.tts.model.talker
    inputs = talker_inputs(talker, [4], seed=0)

    with pytest.raises(TypeError, match="num_beams"):
        FastTalker(talker).generate(**inputs, **stock_talker_kwargs(talker.config, 3, num_beams=2))


def test_batch_buckets() -> None:
    assert [batch_bucket(rows) for rows in (1, 2, 3, 5, 33, 64, 65, 130)] == [
        1,
        2,
        4,
        8,
        64,
        64,
        128,
        192,
    ]


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def cuda_talker_and_inputs(tiny_model_dir: Path) -> tuple[Any, dict[str, Any]]:
    talker = Engine.load(tiny_model_dir, device="cuda", dtype="float32").tts.model.talker
    inputs = talker_inputs(talker, [12, 7, 10, 5, 12, 9], seed=1)
    return talker, {name: tensor.cuda() for name, tensor in inputs.items()}


@needs_cuda
def test_cuda_graph_replays_give_the_eager_codes(tiny_model_dir: Path) -> None:
    talker, inputs = cuda_talker_and_inputs(tiny_model_dir)
    kwargs = stock_talker_kwargs(talker.config, 40, **GREEDY)
    eager = FastTalker(talker, cuda_graphs=False).generate(**inputs, **kwargs)
    graphed = FastTalker(talker, cuda_graphs=True, check_every=4, max_rows=8, max_positions=512)
    graphed.warm_up()  # captures every step; requests only replay

    first = graphed.generate(**inputs, **kwargs)
    again = graphed.generate(**inputs, **kwargs)

    assert len(graphed._graphs) == 4 * 2 * (1 + 2)  # buckets 1-8, both widths, 2 lengths
    assert torch.equal(first, eager)
    assert torch.equal(again, eager)


@needs_cuda
def test_cuda_graph_sampling_repeats_under_a_seed(tiny_model_dir: Path) -> None:
    talker, inputs = cuda_talker_and_inputs(tiny_model_dir)
    kwargs = stock_talker_kwargs(talker.config, 40)
    graphed = FastTalker(talker, cuda_graphs=True, max_rows=8, max_positions=512)
    graphed.warm_up()

    def sample(seed: int) -> Any:
        return graphed.generate(**inputs, **kwargs, options=RowOptions(seeds=[seed] * 6))

    first, again = sample(4), sample(4)

    assert torch.equal(first, again)
    assert int(first.max()) < CODEBOOK_SIZE
