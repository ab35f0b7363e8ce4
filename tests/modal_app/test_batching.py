"""Continuous batching in the fast loop, on the tiny model on a CPU: concurrent calls share one
generation loop, and what a row produces does not depend on what runs beside it.

Greedy decoding is deterministic, so a row's codes must be the same alone, batched from the
start and admitted into a running batch; seeded sampling draws per-row noise, so a seeded
request repeats whatever its companions are.
"""

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the engine extra")
pytest.importorskip("qwen_tts", reason="needs the engine extra")

from modal_app.engine import CloneInput, Engine, EngineOptions  # noqa: E402
from modal_app.errors import RequestStopped  # noqa: E402
from modal_app.fastgen import (  # noqa: E402
    FastTalker,
    GenerationStopped,
    RowOptions,
    stock_talker_kwargs,
)
from schemas.vocabulary import GenerationParams  # noqa: E402
from tests.fixtures.model import REFERENCE_TRANSCRIPT, SAMPLES_PER_FRAME  # noqa: E402
from tests.modal_app.test_fastgen import GREEDY, talker_inputs  # noqa: E402

pytestmark = pytest.mark.engine

WAIT_SECONDS = 60.0  # bound on every wait for the loop; generations here take well under it


@pytest.fixture(scope="module")
def batching_engine(tiny_model_dir: Path) -> Engine:
    options = EngineOptions(generation="fast", max_batch_rows=8, max_positions=512)
    return Engine.load(tiny_model_dir, options=options)


@pytest.fixture(scope="module")
def talker(engine: Engine) -> Any:
    return engine.tts.model.talker


def generate_rows(fast: FastTalker, talker: Any, lengths: list[int], seed: int, **kwargs: Any):
    """One call of rows with random prompts (`talker_inputs`), greedy unless told otherwise."""
    options = kwargs.pop("options", None)
    frames = kwargs.pop("max_new_tokens", 20)
    settings = stock_talker_kwargs(talker.config, frames, **(GREEDY | kwargs))
    return fast.generate(**talker_inputs(talker, lengths, seed), **settings, options=options)


def in_threads(*calls: Callable[[], Any]) -> list[Any]:
    """Run the calls at once, one thread each; their results (or exceptions) in order."""
    start = threading.Barrier(len(calls))

    def run(call: Callable[[], Any]) -> Any:
        start.wait(timeout=WAIT_SECONDS)
        try:
            return call()
        except Exception as exc:  # returned, so a test can assert on it
            return exc

    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(run, call) for call in calls]
        return [future.result(timeout=WAIT_SECONDS) for future in futures]


def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        assert time.monotonic() < deadline, "the loop never got there"
        time.sleep(0.005)


def test_a_rows_codes_are_the_same_alone_and_batched_from_the_start(talker: Any) -> None:
    fast = FastTalker(talker, check_every=3)
    alone = [generate_rows(fast, talker, [length], seed) for length, seed in ((9, 1), (5, 2))]

    together = in_threads(
        lambda: generate_rows(fast, talker, [9], 1),
        lambda: generate_rows(fast, talker, [5], 2),
        lambda: generate_rows(fast, talker, [12, 7], 3),
    )

    assert torch.equal(together[0], alone[0])
    assert torch.equal(together[1], alone[1])
    assert fast.stats.largest_batch >= 3


def test_a_row_admitted_into_a_running_batch_gives_its_codes_alone(talker: Any) -> None:
    fast = FastTalker(talker, check_every=2)
    long_alone = generate_rows(fast, talker, [10, 6], 4, max_new_tokens=40)
    short_alone = generate_rows(fast, talker, [8], 5)

    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(generate_rows, fast, talker, [10, 6], 4, max_new_tokens=40)
        wait_until(lambda: bool(fast._slots) and fast._slots[0].count > 0)
        admitted = generate_rows(fast, talker, [8], 5)  # joins the running batch
        still_running = not running.done()
        long_codes = running.result(timeout=WAIT_SECONDS)

    assert still_running
    assert torch.equal(admitted, short_alone)
    assert torch.equal(long_codes, long_alone)
    assert fast.stats.largest_batch == 3


def test_a_row_arriving_for_a_free_slot_joins_the_running_window(talker: Any) -> None:
    fast = FastTalker(talker, check_every=400)  # one window would be the whole long call
    short_alone = generate_rows(fast, talker, [8], 5, max_new_tokens=6)

    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(generate_rows, fast, talker, [10], 4, max_new_tokens=300)
        wait_until(lambda: bool(fast._slots) and fast.stats.rows == 2)  # the long row is in
        admitted = generate_rows(fast, talker, [8], 5, max_new_tokens=6)
        running.result(timeout=WAIT_SECONDS)

    # It ran beside the long row, admitted a frame after it arrived: not after 299 frames.
    assert fast.stats.largest_batch == 2
    assert torch.equal(admitted, short_alone)


def test_rows_with_different_sampling_settings_share_a_batch(talker: Any) -> None:
    fast = FastTalker(talker, check_every=2)
    greedy = lambda: generate_rows(fast, talker, [9], 6)  # noqa: E731
    # top-k off: the full vocabulary (a wide step); top-k 5 with top-p: a narrow one
    wide = lambda: generate_rows(  # noqa: E731
        fast, talker, [7], 7, do_sample=True, top_k=0, options=RowOptions(seeds=[11])
    )
    narrow = lambda: generate_rows(  # noqa: E731
        fast, talker, [11], 8, do_sample=True, subtalker_dosample=True, top_k=5, top_p=0.8,
        temperature=0.7, repetition_penalty=1.3, options=RowOptions(seeds=[12]),
    )  # fmt: skip
    alone = [greedy(), wide(), narrow()]

    together = in_threads(greedy, wide, narrow)

    for mixed, single in zip(together, alone, strict=True):
        assert torch.equal(mixed, single)
    assert fast.stats.largest_batch >= 2
    assert not torch.equal(alone[1], generate_rows(fast, talker, [7], 7))  # it did sample


def test_cancelling_a_call_removes_only_its_rows(talker: Any) -> None:
    fast = FastTalker(talker, check_every=2)
    other_alone = generate_rows(fast, talker, [8, 5], 9, max_new_tokens=30)
    cancel = threading.Event()

    def cancelled_call() -> Any:
        options = RowOptions(stop=lambda: "cancelled" if cancel.is_set() else None)
        return generate_rows(fast, talker, [6, 6, 6], 10, max_new_tokens=400, options=options)

    with ThreadPoolExecutor(2) as pool:
        doomed = pool.submit(cancelled_call)
        wait_until(lambda: fast.stats.rows >= 3)
        other = pool.submit(generate_rows, fast, talker, [8, 5], 9, max_new_tokens=30)
        wait_until(lambda: fast.stats.largest_batch == 5)
        cancel.set()
        with pytest.raises(GenerationStopped, match="cancelled"):
            doomed.result(timeout=WAIT_SECONDS)
        assert torch.equal(other.result(timeout=WAIT_SECONDS), other_alone)

    assert fast.stats.rows_stopped == 3
    wait_until(lambda: not fast._slots)  # nothing left holding the loop


def test_a_row_with_non_finite_logits_fails_alone_and_leaves_a_clean_slot(talker: Any) -> None:
    fast = FastTalker(talker, max_rows=2, check_every=2)
    healthy_alone = generate_rows(fast, talker, [8], 13)
    poisoned = talker_inputs(talker, [6], seed=14)
    poisoned["inputs_embeds"][0, -1, 0] = float("nan")
    settings = stock_talker_kwargs(talker.config, 20, **GREEDY)

    results = in_threads(
        lambda: fast.generate(**poisoned, **settings),
        lambda: generate_rows(fast, talker, [8], 13),
    )

    assert isinstance(results[0], RuntimeError)
    assert "non-finite" in str(results[0])
    assert torch.equal(results[1], healthy_alone)
    assert fast.stats.rows_non_finite == 1
    # Both slots are used again, the poisoned one too: nothing of its NaNs is left there.
    again = in_threads(*[lambda: generate_rows(fast, talker, [8], 13)] * 2)
    for codes in again:
        assert torch.equal(codes, healthy_alone)


def test_a_callers_failing_callbacks_fail_neither_its_call_nor_the_loop(talker: Any) -> None:
    fast = FastTalker(talker, check_every=2)
    alone = generate_rows(fast, talker, [8], 15)

    def broken() -> None:
        raise RuntimeError("a caller's bug")

    codes = generate_rows(
        fast, talker, [8], 15, options=RowOptions(stop=broken, first_frames=broken)
    )

    assert torch.equal(codes, alone)


def reference_request(
    make_reference_wav: Callable[..., bytes], voice: int, **params: Any
) -> Callable[..., CloneInput]:
    def build(text: str, language: str = "Auto", transcript: bool = False) -> CloneInput:
        return CloneInput(
            text=text,
            language=language,
            reference_audio=make_reference_wav(voice),
            reference_text=REFERENCE_TRANSCRIPT if transcript else None,
            params=GenerationParams(**params),
        )

    return build


def test_a_seeded_request_repeats_beside_different_companions(
    batching_engine: Engine, make_reference_wav: Callable[..., bytes]
) -> None:
    engine = batching_engine
    seeded = reference_request(make_reference_wav, 1, seed=42, max_new_tokens=14)(
        "The same words, every time. And a second sentence.", "English", transcript=True
    )
    # Companions of other voices, languages and sampling settings, long enough (their frame
    # caps, about 60 frames) that the seeded request joins them while they run.
    companions = [
        [
            reference_request(make_reference_wav, 2, max_new_tokens=500, temperature=1.3)(
                "Different company.", "German"
            ),
            reference_request(make_reference_wav, 3, max_new_tokens=500, top_k=3)(
                "Other words entirely, at another length.", "Auto", transcript=True
            ),
        ],
        [
            reference_request(make_reference_wav, 4, max_new_tokens=500, seed=7, top_p=0.5)(
                "Yet another voice.", "French"
            ),
        ],
    ]
    alone = engine.clone(seeded).waveform
    stats = engine.generation_stats()
    assert stats is not None
    stats.largest_batch = 0  # this test's batches only (the engine is the module's)

    for company in companions:
        np.testing.assert_array_equal(clone_beside(engine, seeded, company), alone)
    assert stats.largest_batch == 3  # it ran beside both companions of the first company


def clone_beside(engine: Engine, request: CloneInput, company: list[CloneInput]) -> Any:
    """`request`'s audio, admitted once every companion's row is in the loop."""
    fast = engine._fast
    assert fast is not None
    with ThreadPoolExecutor(len(company)) as pool:
        running = [pool.submit(engine.clone, companion) for companion in company]
        wait_until(lambda: len(fast._slots) == len(company))
        waveform = engine.clone(request).waveform
        outputs = [future.result(timeout=WAIT_SECONDS) for future in running]
    assert all(len(output.waveform) > 0 for output in outputs)
    return waveform


def test_many_threads_calling_clone_at_once_each_get_their_own_audio(
    batching_engine: Engine, make_reference_wav: Callable[..., bytes]
) -> None:
    requests = [
        reference_request(make_reference_wav, voice, seed=voice, max_new_tokens=4 + voice)(
            f"Request number {voice}."
        )
        for voice in range(10)
    ]
    serial = [batching_engine.clone(request).waveform for request in requests]

    outputs = in_threads(*[lambda r=r: batching_engine.clone(r) for r in requests])

    for output, expected, voice in zip(outputs, serial, range(10), strict=True):
        assert not isinstance(output, Exception), repr(output)
        assert len(output.waveform) == (3 + voice) * SAMPLES_PER_FRAME
        np.testing.assert_array_equal(output.waveform, expected)


def test_a_deadline_stops_only_its_own_request(
    batching_engine: Engine, make_reference_wav: Callable[..., bytes]
) -> None:
    slow = reference_request(make_reference_wav, 5, max_new_tokens=400)("Hi.")
    quick = reference_request(make_reference_wav, 6, seed=3, max_new_tokens=10)("Hello there.")
    quick_alone = batching_engine.clone(quick).waveform
    # The tiny model never ends a row: without the deadline it would run to its frame cap.
    engine = Engine.load(
        batching_engine.model_name,
        options=EngineOptions(generation="fast", max_batch_rows=8, min_frame_cap=10_000),
    )
    started = time.monotonic()

    outputs = in_threads(
        lambda: engine.clone(slow, deadline=time.monotonic() + 0.5), lambda: engine.clone(quick)
    )

    assert isinstance(outputs[0], RequestStopped)
    assert "deadline" in str(outputs[0])
    assert time.monotonic() - started < WAIT_SECONDS
    np.testing.assert_array_equal(outputs[1].waveform, quick_alone)


def test_first_frames_are_reported_once_per_call(
    tiny_model_dir: Path, reference_wav: bytes
) -> None:
    options = EngineOptions(generation="fast", chunk_chars=20, max_chunks_per_batch=1)
    engine = Engine.load(tiny_model_dir, options=options)
    reported: list[float] = []
    request = CloneInput(
        text="One short sentence. And another one. And a third.",
        reference_audio=reference_wav,
        params=GenerationParams(max_new_tokens=4),
    )

    output = engine.clone(request, on_first_frames=lambda: reported.append(time.monotonic()))

    assert output.chunks == 3  # three groups through the loop, one after another
    assert len(reported) == 1


def test_a_runaway_row_is_cut_at_its_frame_cap_and_counted(
    tiny_model_dir: Path, reference_wav: bytes
) -> None:
    engine = Engine.load(
        tiny_model_dir,
        options=EngineOptions(generation="fast", frames_per_text_token=2.0, min_frame_cap=5),
    )
    text = "Hello there, my friend."  # the tiny model never says its end token
    cap = engine.frame_cap(text)
    tokens = len(engine.tts.processor.tokenizer(text)["input_ids"])

    output = engine.clone(
        CloneInput(
            text=text, reference_audio=reference_wav, params=GenerationParams(max_new_tokens=300)
        )
    )

    assert cap == max(5, 2 * tokens) < 299
    assert len(output.waveform) == cap * SAMPLES_PER_FRAME
    stats = engine.generation_stats()
    assert stats is not None
    assert stats.rows_capped == 1


def test_moving_the_model_keeps_the_rotary_frequencies_float32(tiny_model_dir: Path) -> None:
    engine = Engine.load(tiny_model_dir, device="cpu", dtype="float32")
    rotary = [module for module in engine.tts.model.modules() if hasattr(module, "inv_freq")]
    before = [module.inv_freq.clone() for module in rotary]

    engine.to("cpu", "bfloat16")

    assert rotary
    assert engine.tts.model.dtype == torch.bfloat16
    for module, original in zip(rotary, before, strict=True):
        assert module.inv_freq.dtype == torch.float32
        assert torch.equal(module.inv_freq, original)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def cuda_fast(tiny_model_dir: Path, dtype: str = "float32") -> tuple[Engine, FastTalker]:
    engine = Engine.load(
        tiny_model_dir,
        device="cuda",
        dtype=dtype,
        options=EngineOptions(generation="fast", max_batch_rows=8, max_positions=512),
    )
    engine.warm_up()
    assert engine._fast is not None
    return engine, engine._fast


@needs_cuda
def test_cuda_bf16_generation_has_no_non_finite_rows(
    tiny_model_dir: Path, reference_wav: bytes
) -> None:
    engine, fast = cuda_fast(tiny_model_dir, "bfloat16")
    request = CloneInput(
        text="Hello there.", reference_audio=reference_wav, params=GenerationParams(seed=1)
    )

    outputs = in_threads(*[lambda: engine.clone(request)] * 6)

    for output in outputs:
        assert np.isfinite(output.waveform).all()
    assert fast.stats.rows_non_finite == 0


@needs_cuda
def test_cuda_memory_is_stable_over_20_calls(tiny_model_dir: Path, reference_wav: bytes) -> None:
    engine, _ = cuda_fast(tiny_model_dir)
    request = CloneInput(
        text="Hello there.",
        reference_audio=reference_wav,
        params=GenerationParams(max_new_tokens=20),
    )
    engine.clone(request)
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()

    for _ in range(20):
        engine.clone(request)
    torch.cuda.synchronize()

    assert torch.cuda.memory_allocated() <= baseline + 1024 * 1024


@needs_cuda
def test_cuda_compaction_and_longer_attention_under_replay_give_the_eager_codes(
    tiny_model_dir: Path,
) -> None:
    engine, _ = cuda_fast(tiny_model_dir)
    talker = engine.tts.model.talker
    eager = FastTalker(talker, cuda_graphs=False, max_rows=8, max_positions=512, kv_step=16)
    graphed = FastTalker(talker, cuda_graphs=True, max_rows=8, max_positions=512, kv_step=16)
    graphed.warm_up()
    eos = talker.config.codec_eos_token_id
    talker.generation_config.sequence_bias = [[[eos], 0.15]]  # rows end at different frames
    try:
        inputs = {k: v.cuda() for k, v in talker_inputs(talker, [12, 7, 10, 5, 12, 9], 1).items()}
        settings = stock_talker_kwargs(talker.config, 60, **GREEDY)
        expected = eager.generate(**inputs, **settings)
        replayed = graphed.generate(**inputs, **settings)
    finally:
        talker.generation_config.sequence_bias = [[[eos], -1e9]]  # the fixed-length model's
    assert torch.equal(replayed, expected)
