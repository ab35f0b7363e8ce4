"""The Qwen3-TTS voice-cloning engine, shared by the Modal service and the worker's `local` backend.

Pure Python (no Modal). One `Engine` wraps one loaded `Qwen3TTSModel` and adds what the model
lacks for serving: validation with clear errors, an LRU of voice-clone prompts so a voice used
again is not re-encoded, sentence chunking, per-chunk seeds and frame caps, and encoding.

An engine is shared by threads. With the fast generation loop, concurrent calls validate, build
their prompts and decode their audio on their own threads, and every call's chunks are
generated together in one continuously batched loop (`modal_app.fastgen`); a seeded call gives
the same audio whatever runs beside it. (So decodes are not merged across calls: a decode
batched beside other calls' codes differs from one alone in the last bits of its floats.) The
stock loop serves one call at a time.
"""

import functools
import hashlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import numpy as np
import soxr
import torch
from qwen_tts import Qwen3TTSModel
from qwen_tts.inference.qwen3_tts_model import VoiceClonePromptItem

from modal_app.audio import DecodedAudio, crossfade_join, encode_audio
from modal_app.contract import (
    BatchCloneInput,
    BatchCloneOutput,
    CloneInput,
    CloneOutput,
    EngineInfo,
    EngineOptions,
    VoiceRequest,
)
from modal_app.decode_activations import cache_snake_parameters
from modal_app.decode_masks import cache_decode_masks
from modal_app.decoder_graph import (
    decoder_graph_installed,
    install_decoder_graph,
    remove_decoder_graph,
)
from modal_app.errors import RequestStopped
from modal_app.fastgen import FastTalker, GenerationStopped, LoopStats, RowOptions, row_options
from modal_app.languages import SUPPORTED_LANGUAGES, normalize_language
from modal_app.prompt_cache import PromptCache
from modal_app.reference_context import generate_voice_clone, speech_codec, speech_tokenizer
from modal_app.text import chunk_text
from schemas.vocabulary import (
    AudioFormat,
    ErrorCode,
    GenerationFailed,
    GenerationParams,
    InvalidInput,
    VoicecloneError,
)

__all__ = [  # the engine's public API, in one import
    "BatchCloneInput",
    "BatchCloneOutput",
    "CloneInput",
    "CloneOutput",
    "Engine",
    "EngineInfo",
    "EngineOptions",
    "GenerationParams",
    "pick_device",
    "pick_dtype",
]

logger = logging.getLogger(__name__)

MODEL_SAMPLE_RATE = 24_000  # the speech tokenizer and speaker encoder both work at 24 kHz
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


class Engine:
    """A loaded model plus the serving logic around it. Build with `Engine.load`."""

    def __init__(
        self,
        tts: Qwen3TTSModel,
        *,
        model_name: str,
        attn_implementation: str,
        options: EngineOptions,
        load_seconds: float,
    ) -> None:
        self._tts = tts
        tts.processor = _SerializedProcessor(tts.processor)
        # Decodes only the reference's last frames before a call's own (in ICL mode).
        # (Instance attributes that shadow the class's methods, on purpose.)
        tts.generate_voice_clone = functools.partial(generate_voice_clone, tts)  # pyright: ignore[reportAttributeAccessIssue]
        cache_decode_masks(tts)
        cache_snake_parameters(tts)
        self.model_name = model_name
        self.attn_implementation = attn_implementation
        self.options = options
        self.load_seconds = load_seconds
        self.languages = _model_languages(tts)
        self._prompts: PromptCache[VoiceClonePromptItem] = PromptCache(options.prompt_cache_size)
        self._fast: FastTalker | None = None
        if options.generation == "fast":
            self._fast = FastTalker(
                tts.model.talker,
                max_rows=options.max_batch_rows,
                max_positions=options.max_positions,
                compile_steps=options.compile_steps,
            )
            # Installed for the engine's life: the loop takes any number of threads' calls.
            tts.model.talker.generate = self._fast.generate_like_stock  # pyright: ignore[reportAttributeAccessIssue]
        # The stock loop seeds torch's global generator and runs one call at a time.
        self._stock_lock = threading.Lock()

    @classmethod
    def load(
        cls,
        model: str | os.PathLike[str],
        *,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        attn_implementation: str = "sdpa",
        options: EngineOptions | None = None,
    ) -> "Engine":
        """Load from a local folder or a hub id. Device defaults to CUDA when present; dtype to
        bf16 on GPUs that have it, fp16 on older ones (T4), fp32 on CPU."""
        if attn_implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation must be one of {ATTENTION_IMPLEMENTATIONS}")
        started = time.perf_counter()
        device = pick_device(device)
        tts = Qwen3TTSModel.from_pretrained(
            os.fspath(model),
            device_map=device,
            dtype=pick_dtype(device, dtype),
            attn_implementation=attn_implementation,
        )
        _pad_with_end_token(tts)
        engine = cls(
            tts,
            model_name=os.fspath(model),
            attn_implementation=attn_implementation,
            options=options or EngineOptions(),
            load_seconds=time.perf_counter() - started,
        )
        logger.info(
            "Loaded %s on %s in %.1f s (%s generation)",
            engine.model_name,
            device,
            engine.load_seconds,
            engine.options.generation,
        )
        return engine

    @property
    def tts(self) -> Qwen3TTSModel:
        """The underlying qwen-tts model, for benchmarks and diagnostics."""
        return self._tts

    @property
    def decoder_traced(self) -> bool:
        """Whether decodes run the speech decoder's traced graph (`warm_up` installs it)."""
        return decoder_graph_installed(self._tts)

    @property
    def device(self) -> torch.device:
        return self._tts.model.device

    def describe(self) -> EngineInfo:
        device = self.device
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
        return EngineInfo(
            model=self.model_name,
            device=str(device),
            dtype=str(self._tts.model.dtype).removeprefix("torch."),
            attention_implementation=self.attn_implementation,
            gpu=gpu,
            languages=list(self.languages),
        )

    def to(self, device: str, dtype: str | torch.dtype | None = None) -> None:
        """Move the model, e.g. from a CPU memory snapshot onto the GPU (before serving: calls
        in flight fail). Clears the prompt cache; the rotary frequencies stay float32."""
        target = torch.device(device)
        torch_dtype = pick_dtype(str(target), dtype)
        with self._stock_lock:
            remove_decoder_graph(self._tts)  # it holds the old device's tensors; warm_up traces
            tokenizer = speech_tokenizer(self._tts)
            # transformers wraps `to` so that its stub reads as the unbound `Module.to`.
            self._tts.model.to(device=target, dtype=torch_dtype)  # pyright: ignore[reportCallIssue]
            speech_codec(self._tts).to(device=target, dtype=torch_dtype)
            tokenizer.device = target  # pyright: ignore[reportAttributeAccessIssue]  # declared None only
            self._tts.device = target
            _keep_rotary_frequencies_float32(self._tts.model)
            self._prompts.clear()
        self.reset_generation_state()

    def reset_generation_state(self) -> None:
        """Reallocate the fast loop's workspace on the model's device and drop its CUDA graphs
        (`warm_up` captures them again); no-op for the stock loop. `to` does it too."""
        if self._fast is not None:
            self._fast.reset()

    def warm_up(self) -> None:
        """Capture the fast loop's CUDA graphs, trace the speech decoder (`decoder_graph`),
        then one tiny generation, so no request pays for first-use setup."""
        if self._fast is not None:
            self._fast.warm_up()
        if self.options.trace_decoder:
            install_decoder_graph(self._tts)
        noise = np.random.default_rng(0).normal(0.0, 0.05, MODEL_SAMPLE_RATE).astype(np.float32)
        with _generation_errors():
            prompt = self._tts.create_voice_clone_prompt(
                ref_audio=(noise, MODEL_SAMPLE_RATE), x_vector_only_mode=True
            )
            self._generate(["Hello."], ["Auto"], prompt[0], GenerationParams(max_new_tokens=4))

    def generation_stats(self) -> LoopStats | None:
        """The fast loop's counters (rows, rows cut at their frame cap, ...); None for stock."""
        return self._fast.stats if self._fast is not None else None

    def clone(
        self,
        request: CloneInput,
        *,
        cancel: threading.Event | None = None,
        deadline: float | None = None,
        on_first_frames: Callable[[], None] | None = None,
    ) -> CloneOutput:
        """Speak `request.text` in the reference voice. `cancel` (set: give up) and `deadline`
        (a `time.monotonic()` time) end the call with `RequestStopped`; with the fast loop,
        its rows leave the batch within a few frames, and `on_first_frames` is called when the
        loop has produced frames of the call (time to first frame)."""
        calls = _Callbacks(_stopper(cancel, deadline), on_first_frames)
        result = self._run(request, [request.text], [request.language], ["text"], calls)
        return result.items[0]

    def clone_batch(
        self,
        request: BatchCloneInput,
        *,
        cancel: threading.Event | None = None,
        deadline: float | None = None,
    ) -> BatchCloneOutput:
        """Speak many texts in one voice; every chunk of every text goes through one batch."""
        texts = list(request.texts)
        if not texts:
            raise InvalidInput("'texts' must be a non-empty list")
        if len(texts) > self.options.max_batch_texts:
            raise InvalidInput(
                f"'texts' has {len(texts)} entries; the limit is {self.options.max_batch_texts}"
            )
        languages = _languages_per_text(request.languages, len(texts))
        labels = [f"texts[{index}]" for index in range(len(texts))]
        calls = _Callbacks(_stopper(cancel, deadline), None)
        return self._run(request, texts, languages, labels, calls)

    def _run(
        self,
        request: VoiceRequest,
        texts: list[str],
        languages: list[str],
        labels: list[str],
        calls: "_Callbacks",
    ) -> BatchCloneOutput:
        texts = [self._checked_text(text, label) for text, label in zip(texts, labels, strict=True)]
        languages = [normalize_language(name, self.languages) for name in languages]
        audio_format = AudioFormat.parse(request.output_format)
        transcript = (request.reference_text or "").strip() or None
        started = time.perf_counter()
        prompt, cache_hit = self._prompt(request.reference_audio, transcript)
        parts, capped = self._synthesize(texts, languages, prompt, request.params, calls)
        inference_seconds = time.perf_counter() - started
        fade = self.options.crossfade_seconds
        items = [
            _clone_output(
                crossfade_join(chunks, MODEL_SAMPLE_RATE, fade),
                len(chunks),
                audio_format,
                inference_seconds,
                cache_hit,
                capped=index in capped,
            )
            for index, chunks in enumerate(parts)
        ]
        return BatchCloneOutput(
            items=items, inference_seconds=inference_seconds, prompt_cache_hit=cache_hit
        )

    def _checked_text(self, text: str, label: str) -> str:
        if not isinstance(text, str) or not text.strip():
            raise InvalidInput(f"'{label}' is required")
        if len(text) > self.options.max_text_chars:
            raise InvalidInput(
                f"Text too long: '{label}' has {len(text)} characters;"
                f" the limit is {self.options.max_text_chars}",
                code=ErrorCode.TEXT_TOO_LONG,
            )
        return text.strip()

    def _prompt(
        self, reference: bytes | DecodedAudio, transcript: str | None
    ) -> tuple[VoiceClonePromptItem, bool]:
        """The voice-clone prompt for this voice, from the cache when the same audio and
        transcript were seen before. Transcript given: ICL mode; none: x-vector-only mode."""
        key = (_digest(reference), transcript)
        cached = self._prompts.get(key)
        if cached is not None:
            return cached, True
        audio = self._checked_reference(reference)
        with _generation_errors():
            # (array, 24000) in, so qwen-tts never resamples (librosa's first resample is slow).
            prompt = self._tts.create_voice_clone_prompt(
                ref_audio=(audio.samples, audio.sample_rate),
                ref_text=transcript,
                x_vector_only_mode=transcript is None,
            )[0]
        self._prompts.put(key, prompt)
        return prompt, False

    def _checked_reference(self, reference: bytes | DecodedAudio) -> DecodedAudio:
        audio = (
            reference if isinstance(reference, DecodedAudio) else DecodedAudio.from_bytes(reference)
        )
        if np.asarray(audio.samples).ndim != 1:
            raise InvalidInput("Reference audio samples must be mono (one dimension)")
        low, high = self.options.min_reference_seconds, self.options.max_reference_seconds
        if not low <= audio.duration_seconds <= high:
            raise InvalidInput(
                f"Reference audio lasts {audio.duration_seconds:.2f} s; "
                f"it must last between {low:g} and {high:g} s"
            )
        return resample(audio, MODEL_SAMPLE_RATE)

    def _synthesize(
        self,
        texts: list[str],
        languages: list[str],
        prompt: VoiceClonePromptItem,
        params: GenerationParams,
        calls: "_Callbacks | None" = None,
    ) -> tuple[list[list[np.ndarray]], set[int]]:
        """Each text's chunk waveforms, and the texts of which a chunk was cut at its frame cap
        (fast loop). All chunks of all texts share batches, as few as the per-batch limit
        allows, so a long text costs about as much time as its longest chunk. Chunk i of a
        seeded call is seeded from (seed, i), so it repeats on its own."""
        jobs = [
            (index, chunk, language)
            for index, (text, language) in enumerate(zip(texts, languages, strict=True))
            for chunk in chunk_text(text, self.options.chunk_chars)
        ]
        parts: list[list[np.ndarray]] = [[] for _ in texts]
        capped: set[int] = set()  # added to on the loop's thread, read after the call
        step = self.options.max_chunks_per_batch
        with self._one_call_if_stock(params):
            for start in range(0, len(jobs), step):
                group = jobs[start : start + step]
                chunks = [chunk for _, chunk, _ in group]
                languages = [language for *_, language in group]
                seeds = [_chunk_seed(params.seed, start + i) for i in range(len(group))]
                if start and calls is not None:  # the first frames come from the first group
                    calls = calls._replace(first_frames=None)
                texts_of_rows = [index for index, _, _ in group]
                waves = self._generate(
                    chunks, languages, prompt, params, seeds, calls,
                    capped=lambda row, rows=texts_of_rows: capped.add(rows[row]),
                )  # fmt: skip
                for index, wave in zip(texts_of_rows, waves, strict=True):
                    parts[index].append(wave)
        return parts, capped

    @contextmanager
    def _one_call_if_stock(self, params: GenerationParams) -> Iterator[None]:
        """The stock loop draws from torch's global generator: one call at a time, seeded."""
        if self._fast is not None:
            yield
            return
        with self._stock_lock:
            if params.seed is not None:
                torch.manual_seed(params.seed)
            yield

    def _generate(
        self,
        chunks: list[str],
        languages: list[str],
        prompt: VoiceClonePromptItem,
        params: GenerationParams,
        seeds: list[int | None] | None = None,
        calls: "_Callbacks | None" = None,
        capped: Callable[[int], None] | None = None,
    ) -> list[np.ndarray]:
        """The chunks' waveforms; `capped` is told the index of each chunk cut at its cap."""
        caps = [self.frame_cap(chunk) for chunk in chunks]
        stop, first_frames = calls or _Callbacks(None, None)
        options = RowOptions(seeds, caps, stop, first_frames, capped)
        sampling: dict[str, Any] = params.sampling_kwargs()
        with _generation_errors(), row_options(options):
            waves, sample_rate = self._tts.generate_voice_clone(
                text=chunks,
                language=languages,
                voice_clone_prompt=[prompt] * len(chunks),
                **sampling,
            )
        if sample_rate != MODEL_SAMPLE_RATE:
            raise GenerationFailed(
                f"Model produced {sample_rate} Hz audio, not {MODEL_SAMPLE_RATE}"
            )
        return [np.asarray(wave, dtype=np.float32) for wave in waves]

    def frame_cap(self, text: str) -> int:
        """The most frames a chunk may run (fast loop): a multiple of what its text takes to
        say, so a row that never says its end token stops instead of holding its batch."""
        tokens = self._tts.processor.count_tokens(text)
        return max(
            self.options.min_frame_cap, math.ceil(tokens * self.options.frames_per_text_token)
        )


class _SerializedProcessor:
    """qwen-tts's text processor, one call at a time: a Hugging Face fast tokenizer used from
    two threads at once fails ("Already borrowed")."""

    def __init__(self, processor: Any) -> None:
        self._processor = processor
        self._lock = threading.Lock()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return self._processor(*args, **kwargs)

    def count_tokens(self, text: str) -> int:
        with self._lock:
            return len(self._processor.tokenizer(text)["input_ids"])

    def __getattr__(self, name: str) -> Any:
        return getattr(self._processor, name)


def pick_device(requested: str | None) -> str:
    if requested:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(device: str, requested: str | torch.dtype | None) -> torch.dtype:
    """bf16 where the GPU computes it natively (Ampere and later), fp16 on older GPUs, fp32 on
    CPU. `torch.cuda.is_bf16_supported` is not used: it reports emulated bf16 on a T4 as support."""
    if isinstance(requested, torch.dtype):
        return requested
    if requested:
        try:
            return _DTYPES[requested.lower()]
        except KeyError:
            raise ValueError(f"Unknown dtype {requested!r}; use one of {sorted(_DTYPES)}") from None
    if torch.device(device).type != "cuda":
        return torch.float32
    major, _ = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if major >= 8 else torch.float16


def resample(audio: DecodedAudio, sample_rate: int) -> DecodedAudio:
    if audio.sample_rate == sample_rate:
        return audio
    samples = soxr.resample(
        np.asarray(audio.samples, dtype=np.float32), audio.sample_rate, sample_rate
    )
    return DecodedAudio(samples=samples.astype(np.float32), sample_rate=sample_rate)


@contextmanager
def _generation_errors() -> Iterator[None]:
    """Model failures become `GenerationFailed`; our own errors pass through unchanged."""
    try:
        yield
    except VoicecloneError:
        raise
    except GenerationStopped as exc:
        raise RequestStopped(f"Generation stopped: {exc}") from exc
    except Exception as exc:
        raise GenerationFailed(f"Generation failed: {exc}") from exc


class _Callbacks(NamedTuple):
    """What a call asks of the generation loop: when to stop, whom to tell of first frames."""

    stop: Callable[[], str | None] | None
    first_frames: Callable[[], None] | None


def _stopper(
    cancel: threading.Event | None, deadline: float | None
) -> Callable[[], str | None] | None:
    """Why a call should stop now (None: go on), from its cancel event and deadline."""
    if cancel is None and deadline is None:
        return None

    def stop() -> str | None:
        if cancel is not None and cancel.is_set():
            return "the request was cancelled"
        if deadline is not None and time.monotonic() >= deadline:
            return "the request's deadline passed"
        return None

    return stop


def _chunk_seed(seed: int | None, index: int) -> int | None:
    """Chunk `index`'s seed: distinct per chunk, fixed by the call's seed (None: random)."""
    if seed is None:
        return None
    return (seed + index * 0x9E3779B97F4A7C15) % 2**63


def _keep_rotary_frequencies_float32(model: torch.nn.Module) -> None:
    """`Module.to(dtype=bf16)` casts every floating buffer, the rotary embeddings' `inv_freq`
    too, which coarsens every position's angle; put back the float32 values they were built
    with (kept as `original_inv_freq`)."""
    for module in model.modules():
        original = getattr(module, "original_inv_freq", None)
        current = getattr(module, "inv_freq", None)
        if isinstance(original, torch.Tensor) and isinstance(current, torch.Tensor):
            module.inv_freq = original.to(device=current.device, dtype=torch.float32)


def _digest(reference: bytes | DecodedAudio) -> str:
    hasher = hashlib.sha256()
    if isinstance(reference, DecodedAudio):
        hasher.update(np.ascontiguousarray(reference.samples, dtype=np.float32).tobytes())
        hasher.update(str(reference.sample_rate).encode())
    elif isinstance(reference, bytes | bytearray | memoryview):
        hasher.update(reference)
    else:
        raise InvalidInput("Reference audio must be bytes or DecodedAudio")
    return hasher.hexdigest()


def _languages_per_text(languages: Sequence[str] | str, count: int) -> list[str]:
    if isinstance(languages, str):
        return [languages] * count
    names = list(languages)
    if len(names) == 1:
        return names * count
    if len(names) != count:
        raise InvalidInput(f"'languages' has {len(names)} entries for {count} texts")
    return names


def _pad_with_end_token(tts: Qwen3TTSModel) -> None:
    """Transformers warns on every call when the talker has no pad token and then pads with the
    end token; qwen-tts cuts each sequence at that token anyway, so set it and skip the noise."""
    generation_config = tts.model.talker.generation_config
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tts.model.config.talker_config.codec_eos_token_id


def _model_languages(tts: Qwen3TTSModel) -> tuple[str, ...]:
    """Our language names that this model's codec actually knows (all eleven for the real ones)."""
    known = tts.get_supported_languages()
    if known is None:  # the model states no constraint
        return SUPPORTED_LANGUAGES
    return tuple(name for name in SUPPORTED_LANGUAGES if name.lower() in set(known))


def _clone_output(
    waveform: np.ndarray,
    chunks: int,
    audio_format: AudioFormat,
    inference_seconds: float,
    cache_hit: bool,
    *,
    capped: bool,
) -> CloneOutput:
    return CloneOutput(
        audio=encode_audio(waveform, MODEL_SAMPLE_RATE, audio_format),
        audio_format=audio_format,
        sample_rate=MODEL_SAMPLE_RATE,
        duration_seconds=len(waveform) / MODEL_SAMPLE_RATE,
        inference_seconds=inference_seconds,
        prompt_cache_hit=cache_hit,
        chunks=chunks,
        waveform=waveform,
        capped=capped,
    )
