"""A continuously batching talker generation loop for Qwen3-TTS, with the stock one's results.

qwen-tts builds the talker's prompt (text, speaker embedding, reference codes) and then calls
`talker.generate`, transformers' generic loop: a growing KV cache, a `code_predictor.generate`
call per frame, logits processors and a host synchronisation every step. `FastTalker` replaces
only that call. It is thread-safe: each caller's rows join one generation loop, run by a thread
of the talker's own, that owns the device:

- one workspace allocated when the loop is built, at its maximum (`max_rows` rows, each with
  `max_positions` talker positions): static KV caches and every per-row tensor, written in place;
- per 12.5 Hz frame, the code predictor's loop (codebooks 1..15) and the talker's decode step as
  two functions that touch only the workspace, captured as CUDA graphs per (batch bucket,
  attention length, top-k width) during `warm_up`, then only replayed;
- every row carries its own position, text cursor, sampling settings, frame limit and seed;
  sampling noise is a hash of (seed, frame, codebook, token), so a seeded row draws the same
  numbers whatever rows run beside it; top-k goes through `topk`, not a sort of the vocabulary;
- every `check_every` frames the loop copies that window's codes to the host once, retires
  finished rows, drops the rows of callers that stopped (cancelled, past their deadline),
  compacts the live rows to the front so the batch bucket shrinks, and admits waiting rows into
  the free slots (a prefill of each newcomer only); a row that arrives while a slot is free
  ends the window at the next frame, so it waits a frame, not a window;
- a row whose logits turn non-finite ends with an error for its caller, and its slot's cache is
  zeroed, so nothing of it reaches a later row.

On a CPU the same code runs without graph capture, which is how the tests compare it with the
stock loop. `FastTalker.installed()` routes qwen-tts's own `generate_voice_clone` through it, so
prompt building, trimming at the end token and the speech-tokenizer decode stay theirs (and run
on the caller's thread, beside the loop).
"""

import logging
import math
import secrets
import threading
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import partial
from types import SimpleNamespace
from typing import Any

import torch
from qwen_tts.core.models.modeling_qwen3_tts import (
    Qwen3TTSTalkerCodePredictorModel,
    Qwen3TTSTalkerForConditionalGeneration,
    Qwen3TTSTalkerModel,
)
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

__all__ = [
    "FastTalker",
    "GenerationStopped",
    "LoopStats",
    "RowOptions",
    "TalkerSampling",
    "batch_bucket",
    "row_options",
    "stock_talker_kwargs",
]

logger = logging.getLogger(__name__)

_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
_KV_STEP = 256  # attention-length bucket: graphs attend over a multiple of this many positions
_GROUPED_SDPA = "fastgen_grouped_sdpa"  # our attention function's name in transformers' registry
_TOP_K_WIDTH = 64  # candidates a narrow step keeps; rows with top-k off or larger take a wide one
_MAX_TEXT = 512  # trailing text tokens a row may carry (a 200-character chunk has about 60)
_STAGES = 16  # noise counter: per frame, stage 0 is the talker's token, 1.. the codebooks
# What qwen-tts passes to `talker.generate`; the last two only shape the stock result.
_ACCEPTED_KWARGS = frozenset(
    {
        "max_new_tokens",
        "min_new_tokens",
        "eos_token_id",
        "do_sample",
        "temperature",
        "top_k",
        "top_p",
        "repetition_penalty",
        "subtalker_dosample",
        "subtalker_temperature",
        "subtalker_top_k",
        "subtalker_top_p",
        "suppress_tokens",
        "sequence_bias",
        "output_hidden_states",
        "return_dict_in_generate",
    }
)


class GenerationStopped(Exception):
    """A caller's rows were dropped because it stopped waiting (cancelled or past a deadline)."""


def batch_bucket(rows: int) -> int:
    """The batch size a graph is captured for: a power of two up to 64, then multiples of 64."""
    for size in _BUCKETS:
        if rows <= size:
            return size
    return math.ceil(rows / _BUCKETS[-1]) * _BUCKETS[-1]


@dataclass(frozen=True)
class TalkerSampling:
    """What the stock `talker.generate` call is told (by qwen-tts and the generation config)."""

    max_new_tokens: int
    min_new_tokens: int
    eos_token_id: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    subtalker_dosample: bool
    subtalker_temperature: float
    subtalker_top_k: int
    subtalker_top_p: float
    suppress_tokens: tuple[int, ...] = ()
    token_bias: tuple[tuple[int, float], ...] = ()  # single-token `sequence_bias` entries

    @property
    def wide(self) -> bool:
        """Whether the talker's top-k keeps more candidates than a narrow step holds."""
        return _wide(self.do_sample, self.top_k)

    @property
    def sub_wide(self) -> bool:
        """The same for the code predictor."""
        return _wide(self.subtalker_dosample, self.subtalker_top_k)

    @classmethod
    def from_generate_kwargs(
        cls, kwargs: dict[str, Any], generation_config: Any
    ) -> "TalkerSampling":
        """Read the keyword arguments qwen-tts passes to `talker.generate`; the talker's
        generation config supplies `sequence_bias` (how the fixed-length test model and the
        benchmark mask the end token). Anything this loop does not implement is refused."""
        unknown = set(kwargs) - _ACCEPTED_KWARGS
        if unknown:
            raise TypeError(f"fast generation does not support {sorted(unknown)}")
        bias = kwargs.get("sequence_bias") or getattr(generation_config, "sequence_bias", None)
        return cls(
            max_new_tokens=int(kwargs["max_new_tokens"]),
            min_new_tokens=int(kwargs.get("min_new_tokens") or 0),
            eos_token_id=int(kwargs["eos_token_id"]),
            do_sample=bool(kwargs.get("do_sample", False)),
            temperature=float(kwargs.get("temperature") or 1.0),
            top_k=int(kwargs.get("top_k") or 0),
            top_p=float(kwargs.get("top_p") or 1.0),
            repetition_penalty=float(kwargs.get("repetition_penalty") or 1.0),
            subtalker_dosample=bool(kwargs.get("subtalker_dosample", False)),
            subtalker_temperature=float(kwargs.get("subtalker_temperature") or 1.0),
            subtalker_top_k=int(kwargs.get("subtalker_top_k") or 0),
            subtalker_top_p=float(kwargs.get("subtalker_top_p") or 1.0),
            suppress_tokens=tuple(kwargs.get("suppress_tokens") or ()),
            token_bias=_single_token_bias(bias),
        )


def _wide(do_sample: bool, top_k: int) -> bool:
    return do_sample and not 0 < top_k <= _TOP_K_WIDTH


@dataclass(frozen=True)
class RowOptions:
    """What a caller adds to the stock arguments, per row of its call: a seed (None: a random
    one), a frame cap (None: only `max_new_tokens` limits the row); and for the call, `stop`,
    polled between frames, which returns why the caller no longer wants its rows (or None to
    go on), `first_frames`, called (on the loop's thread) when its first frames are done, and
    `capped`, called (there too) with the index of each row cut at its frame cap."""

    seeds: Sequence[int | None] | None = None
    frame_caps: Sequence[int | None] | None = None
    stop: Callable[[], str | None] | None = None
    first_frames: Callable[[], None] | None = None
    capped: Callable[[int], None] | None = None


_ROW_OPTIONS: ContextVar[RowOptions | None] = ContextVar("fastgen_row_options", default=None)


@contextmanager
def row_options(options: RowOptions) -> Iterator[None]:
    """Within (on this thread): `talker.generate` calls routed here use `options`."""
    token = _ROW_OPTIONS.set(options)
    try:
        yield
    finally:
        _ROW_OPTIONS.reset(token)


def stock_talker_kwargs(talker_config: Any, max_new_tokens: int, **overrides: Any) -> dict:
    """The sampling arguments qwen-tts's `generate` passes to `talker.generate`, at its default
    values (mirrored, as a benchmark or test needs them without building a text prompt)."""
    eos, vocab = talker_config.codec_eos_token_id, talker_config.vocab_size
    return {
        "max_new_tokens": max_new_tokens,
        "min_new_tokens": 2,
        "do_sample": True,
        "top_k": 50,
        "top_p": 1.0,
        "temperature": 0.9,
        "subtalker_dosample": True,
        "subtalker_top_k": 50,
        "subtalker_top_p": 1.0,
        "subtalker_temperature": 0.9,
        "eos_token_id": eos,
        "repetition_penalty": 1.05,
        # The top 1024 ids are control tokens; only the end token may be chosen among them.
        "suppress_tokens": [token for token in range(vocab - 1024, vocab) if token != eos],
        "output_hidden_states": True,
        "return_dict_in_generate": True,
    } | overrides


def _single_token_bias(sequence_bias: Any) -> tuple[tuple[int, float], ...]:
    if not sequence_bias:
        return ()
    items = sequence_bias.items() if isinstance(sequence_bias, dict) else sequence_bias
    pairs = []
    for tokens, bias in items:
        tokens = [tokens] if isinstance(tokens, int) else list(tokens)
        if len(tokens) != 1:
            raise TypeError("fast generation supports sequence_bias on single tokens only")
        pairs.append((int(tokens[0]), float(bias)))
    return tuple(pairs)


class _StaticCache:
    """Preallocated keys and values per layer, shaped (rows, kv heads, positions, head dim).

    Implements the one method the qwen-tts attention layers call on a cache. `select` sets the
    rows and attention length the next call uses, and whether each row writes at a position of
    its own (a decode step) or all rows at the same positions (a prefill, the code predictor).
    The storage never moves, which is what lets a captured graph be replayed."""

    def __init__(self, layers: int, rows: int, heads: int, positions: int, head_dim: int, **kw):
        shape = (rows, heads, positions, head_dim)
        self.keys = [torch.zeros(shape, **kw) for _ in range(layers)]
        self.values = [torch.zeros(shape, **kw) for _ in range(layers)]
        self.row_ids = torch.arange(rows, device=kw["device"])
        self.rows, self.length, self.per_row = slice(0, rows), positions, False

    def select(self, rows: slice, length: int, per_row: bool) -> None:
        self.rows, self.length, self.per_row = rows, length, per_row

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, cache_kwargs: dict
    ) -> tuple[torch.Tensor, torch.Tensor]:
        position = cache_kwargs["cache_position"]
        keys = self.keys[layer_idx][self.rows]
        values = self.values[layer_idx][self.rows]
        if self.per_row:  # one query position per row, at that row's own position
            ids = self.row_ids[: keys.shape[0]]
            keys[ids, :, position] = key[:, :, 0]
            values[ids, :, position] = value[:, :, 0]
        else:
            keys.index_copy_(2, position, key)
            values.index_copy_(2, position, value)
        return keys[:, :, : self.length], values[:, :, : self.length]

    def keep_rows(self, index: torch.Tensor, positions: int) -> None:
        """Move the rows `index` to the front (only the first `positions` are in use)."""
        for tensor in (*self.keys, *self.values):
            tensor[: len(index), :, :positions] = tensor[index, :, :positions]

    def zero_row(self, row: int) -> None:
        for tensor in (*self.keys, *self.values):
            tensor[row].zero_()


class _GraphRunner:
    """Replays a step's CUDA graph when one was captured for its key, else runs it eagerly.
    Graphs are captured only by `capture` (at warm-up), never in the middle of requests.

    A captured function must read and write only tensors whose storage outlives the graph."""

    def __init__(self) -> None:
        self._graphs: dict[Hashable, torch.cuda.CUDAGraph] = {}
        self._pool: Any = None

    def __len__(self) -> int:
        return len(self._graphs)

    def run(self, key: Hashable, step: Callable[[], None]) -> None:
        graph = self._graphs.get(key)
        if graph is None:
            step()
        else:
            graph.replay()

    def capture(self, key: Hashable, step: Callable[[], None]) -> None:
        step()  # once eagerly first: lazy initialisation must not happen during capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            step()  # recorded, not executed
        self._pool = self._pool or graph.pool()
        self._graphs[key] = graph

    def clear(self) -> None:
        self._graphs.clear()
        self._pool = None


# The workspace's tensors with one entry per row, moved together when rows are compacted.
_ROW_STATE = (
    "valid",
    "token",
    "hidden",
    "finished",
    "bad",
    "seen",
    "rope_delta",
    "text",
    "frame",
    "frame_embed",
    "step",
    "position",
    "limit",
    "min_new",
    "bias",
    "do_sample",
    "sub_do_sample",
    "temperature",
    "top_k",
    "top_p",
    "penalty",
    "sub_temperature",
    "sub_top_k",
    "sub_top_p",
    "seed_lo",
    "seed_hi",
)


class _Workspace:
    """Every tensor a frame step reads or writes, for `rows` rows of `positions` talker
    positions each. Steps work on the first `b` rows (the current batch bucket); rows past the
    live ones are idle: finished, frozen at position 0."""

    def __init__(
        self,
        talker: Qwen3TTSTalkerForConditionalGeneration,
        rows: int,
        positions: int,
        text_len: int,
    ) -> None:
        config = talker.config
        cp_config = config.code_predictor_config
        param = next(talker.parameters())
        dev, dtype = param.device, param.dtype
        kw = {"device": dev, "dtype": dtype}
        groups, vocab, width = config.num_code_groups, config.vocab_size, config.hidden_size
        self.rows, self.positions, self.text_len = rows, positions, text_len
        self.cache = _StaticCache(
            config.num_hidden_layers, rows, config.num_key_value_heads, positions,
            _head_dim(config), **kw,
        )  # fmt: skip
        self.cp_cache = _StaticCache(
            cp_config.num_hidden_layers, rows, cp_config.num_key_value_heads, groups,
            _head_dim(cp_config), **kw,
        )  # fmt: skip
        self.cp_positions = torch.arange(groups, device=dev)
        self.cp_causal = torch.ones(groups, groups, dtype=torch.bool, device=dev).tril()

        def per_row(*shape: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.zeros(rows, *shape, dtype=dtype, device=dev)

        self.valid = per_row(positions, dtype=torch.bool)
        self.token = per_row()
        self.hidden = per_row(width, dtype=dtype)
        self.finished = per_row(dtype=torch.bool)
        self.bad = per_row(dtype=torch.bool)  # non-finite logits seen
        self.seen = per_row(vocab, dtype=torch.bool)
        self.rope_delta = per_row()
        self.text = per_row(text_len, width, dtype=dtype)  # trailing text, then the pad embed
        self.frame = per_row(groups)
        self.frame_embed = per_row(width, dtype=dtype)
        self.step = per_row()  # frames done
        self.position = per_row()  # next talker position
        self.limit = per_row()  # frames the row may run
        self.min_new = per_row()
        self.bias = per_row(vocab, dtype=torch.float32)
        self.do_sample = per_row(dtype=torch.bool)
        self.sub_do_sample = per_row(dtype=torch.bool)
        self.temperature = per_row(dtype=torch.float32)
        self.top_p = per_row(dtype=torch.float32)
        self.penalty = per_row(dtype=torch.float32)
        self.sub_temperature = per_row(dtype=torch.float32)
        self.sub_top_p = per_row(dtype=torch.float32)
        self.top_k = per_row()
        self.sub_top_k = per_row()
        self.seed_lo = per_row()
        self.seed_hi = per_row()
        self.clear()

    def clear(self) -> None:
        """Every row idle (after warm-up wrote into them)."""
        for name in _ROW_STATE:
            getattr(self, name).zero_()
        self.finished.fill_(True)
        self.valid[:, 0] = True  # an idle row attends to something, so it computes no NaN
        for name in ("temperature", "top_p", "penalty", "sub_temperature", "sub_top_p"):
            getattr(self, name).fill_(1.0)

    def keep_rows(self, index: torch.Tensor, positions: int) -> None:
        """Move rows `index` to the front (rows after them become idle duplicates)."""
        self.cache.keep_rows(index, positions)
        for name in _ROW_STATE:
            tensor = getattr(self, name)
            tensor[: len(index)] = tensor[index]

    def load_row(self, slot: int, row: "_Row") -> None:
        """Reset slot `slot` for `row`: its own cache zeroed (nothing of an earlier row, not
        even a NaN, can reach it through masked attention), its settings, text and seed."""
        sampling = row.sampling
        self.cache.zero_row(slot)
        self.cp_cache.zero_row(slot)
        length = row.embeds.shape[0]
        self.valid[slot] = False
        self.valid[slot, :length] = True
        self.text[slot] = row.pad
        self.text[slot, : row.text.shape[0]] = row.text
        self.finished[slot] = False
        self.bad[slot] = False
        self.seen[slot] = False
        self.step[slot] = 0
        self.position[slot] = length
        self.limit[slot] = row.limit
        self.min_new[slot] = sampling.min_new_tokens
        self.bias[slot] = _bias_vector(sampling, self.bias.shape[1]).to(self.bias.device)
        self.do_sample[slot] = sampling.do_sample
        self.sub_do_sample[slot] = sampling.subtalker_dosample
        self.temperature[slot] = sampling.temperature
        self.top_k[slot] = sampling.top_k
        self.top_p[slot] = sampling.top_p
        self.penalty[slot] = sampling.repetition_penalty
        self.sub_temperature[slot] = sampling.subtalker_temperature
        self.sub_top_k[slot] = sampling.subtalker_top_k
        self.sub_top_p[slot] = sampling.subtalker_top_p
        self.seed_lo[slot] = row.seed & _M32
        self.seed_hi[slot] = row.seed >> 32


# The two step functions: (workspace, batch bucket, wide) and (..., attention length, wide).
_PredictStep = Callable[[_Workspace, int, bool], None]
_TalkStep = Callable[[_Workspace, int, int, bool], None]


def _bias_vector(sampling: TalkerSampling, vocab: int) -> torch.Tensor:
    """Sequence bias and suppressed tokens as one additive vector (on the CPU)."""
    bias = torch.zeros(vocab, dtype=torch.float32)
    for token, value in sampling.token_bias:
        bias[token] += value
    if sampling.suppress_tokens:
        bias[list(sampling.suppress_tokens)] = -math.inf
    return bias


@dataclass(eq=False)
class _Call:
    """One `generate` call: its rows, how it may be stopped, and when it is done."""

    stop: Callable[[], str | None] | None
    first_frames: Callable[[], None] | None = None
    capped: Callable[[int], None] | None = None
    rows: list["_Row"] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    def fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        for row in self.rows:
            row.ended = True
        self.done.set()

    def row_ended(self) -> None:
        if all(row.ended for row in self.rows):
            self.done.set()


@dataclass(eq=False)
class _Row:
    """One prompt of a call, waiting or in a slot of the loop."""

    call: _Call
    embeds: torch.Tensor  # (prompt length, hidden): the prompt without padding
    text: torch.Tensor  # (trailing text length, hidden)
    pad: torch.Tensor  # (hidden,): read once the text is
    sampling: TalkerSampling
    seed: int
    limit: int  # frames this row may run
    capped: bool  # `limit` comes from the caller's frame cap, not `max_new_tokens`
    windows: list[torch.Tensor] = field(default_factory=list)  # codes, (frames, groups) each
    count: int = 0  # frames run
    length: int | None = None  # frames kept, once the row ended normally
    ended: bool = False

    def take(self, codes: torch.Tensor, eos: int) -> None:
        """Record one window's codes; the row ends at its end token or its limit."""
        self.windows.append(codes)
        self.count += len(codes)
        stops = torch.nonzero(codes[:, 0] == eos)
        if len(stops):
            self.length = self.count - len(codes) + int(stops[0, 0])
        elif self.count >= self.limit:
            self.length = self.limit
        if self.length is not None:
            self.length = min(self.length, self.limit)
            self.ended = True

    def codes(self) -> torch.Tensor:
        return torch.cat(self.windows)[: self.length] if self.windows else torch.zeros(0, 0)


@dataclass
class LoopStats:
    """Counters since the loop was built (read them for metrics)."""

    rows: int = 0  # rows admitted
    rows_capped: int = 0  # rows cut at their frame cap (runaway rows)
    rows_non_finite: int = 0  # rows ended by non-finite logits
    rows_stopped: int = 0  # rows dropped because their caller stopped
    largest_batch: int = 0  # the most rows that ran a window together


class FastTalker:
    """Generates the talker's codes for the rows of every concurrent `generate` call in one
    continuously batched loop.

    `max_rows` rows run at once (more wait for a free slot); each has room for
    `max_positions` talker positions (prompt plus frames). `cuda_graphs` None: capture at
    `warm_up` when the model is on a CUDA device. `check_every`: frames between looks at the
    rows (each look waits for the device; rows join and leave only then). `kv_step`: the
    attention-length bucket. `compile_steps`: run the two step functions through
    `torch.compile` (CUDA only), inside the graphs."""

    def __init__(
        self,
        talker: Qwen3TTSTalkerForConditionalGeneration,
        *,
        max_rows: int = 16,
        max_positions: int = 2048,
        cuda_graphs: bool | None = None,
        check_every: int = 8,
        kv_step: int = _KV_STEP,
        compile_steps: bool = False,
    ) -> None:
        implementation = talker.config._attn_implementation
        if implementation not in ("sdpa", "eager"):
            raise ValueError(f"fast generation needs sdpa or eager attention, not {implementation}")
        if getattr(talker.config, "sliding_window", None) is not None:
            raise ValueError("fast generation does not support sliding-window attention")
        self.talker = talker
        self.max_rows = max_rows
        self.kv_step = kv_step
        self.max_positions = _round_up(max_positions, kv_step)
        self.check_every = max(1, check_every)
        self.stats = LoopStats()
        self._eos = int(talker.config.codec_eos_token_id)
        self._cuda_graphs = cuda_graphs
        self._compile = compile_steps
        self._eager_mask = implementation == "eager"
        self._graphs = _GraphRunner()
        self._cond = threading.Condition()
        self._waiting: deque[_Row] = deque()  # guarded by _cond
        self._slots: list[_Row] = []  # the live rows, row i in slot i (the loop's own)
        self._device = threading.Lock()  # held by the loop while it runs, by reset and warm_up
        self._thread: threading.Thread | None = None
        self._allocate()

    def _allocate(self) -> None:
        self._workspace = _Workspace(self.talker, self.max_rows, self.max_positions, _MAX_TEXT)
        self._graphs.clear()
        self._steps: tuple[_PredictStep, _TalkStep] = (self._predict_codes, self._talker_step)
        if self._compile and self._workspace.token.is_cuda:
            self._steps = (
                torch.compile(self._predict_codes, dynamic=False),
                torch.compile(self._talker_step, dynamic=False),
            )

    @property
    def graphs_enabled(self) -> bool:
        on_cuda = self._workspace.token.is_cuda
        return on_cuda if self._cuda_graphs is None else self._cuda_graphs and on_cuda

    def reset(self) -> None:
        """Reallocate the workspace on the talker's current device and drop the graphs (e.g.
        after the model moved). Calls in flight fail."""
        with self._device:
            self._fail_everything(GenerationStopped("the generation loop was reset"))
            del self._workspace  # freed before the new one is allocated
            self._allocate()

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Capture every (batch bucket, attention length, top-k width) step as a CUDA graph,
        so no request ever waits for a capture (no-op without CUDA graphs)."""
        if not self.graphs_enabled:
            return
        with self._device, self._grouped_attention():
            ws = self._workspace
            predict, talk = self._steps
            for bucket in _BUCKETS[: _BUCKETS.index(batch_bucket(self.max_rows)) + 1]:
                for wide in (False, True):
                    self._graphs.capture(
                        ("codes", bucket, wide), lambda b=bucket, w=wide: predict(ws, b, w)
                    )
                    for length in range(self.kv_step, self.max_positions + 1, self.kv_step):
                        self._graphs.capture(
                            ("talker", bucket, length, wide),
                            lambda b=bucket, n=length, w=wide: talk(ws, b, n, w),
                        )
            ws.clear()

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Within: the talker's `generate` is this loop (qwen-tts calls it from its own
        generate methods, on any number of threads)."""
        # An instance attribute shadows the class's method on purpose (and `del` restores it).
        self.talker.generate = self.generate_like_stock  # pyright: ignore[reportAttributeAccessIssue]
        try:
            yield
        finally:
            del self.talker.generate

    def generate_like_stock(self, **kwargs: Any) -> SimpleNamespace:
        """`generate` with the result shape qwen-tts reads from the stock call: per step a pair
        (hidden states, that frame's codes). qwen-tts keeps only the codes; the hidden states
        are empty (width 0) so its concatenation of them costs nothing."""
        codes = self.generate(**kwargs)
        rows = codes.shape[0]
        empty = (codes.new_zeros(rows, 1, 0, dtype=torch.float32),)
        steps = [(empty, None)] + [(empty, codes[:, t]) for t in range(codes.shape[1])]
        return SimpleNamespace(hidden_states=steps)

    @torch.inference_mode()
    def generate(
        self,
        *,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        trailing_text_hidden: torch.Tensor,
        tts_pad_embed: torch.Tensor,
        options: RowOptions | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Codes shaped (rows, frames, code groups) for `talker.generate`'s arguments (and
        `options`, default: those set by `row_options` on this thread). After a row's end, its
        first codebook holds the end token (as in the stock loop, whose caller cuts there).
        Raises `GenerationStopped` when `options.stop` answered, RuntimeError when a row's
        logits turned non-finite."""
        sampling = TalkerSampling.from_generate_kwargs(kwargs, self.talker.generation_config)
        if sampling.eos_token_id != self._eos:
            raise TypeError("fast generation ends rows at the model's own end token only")
        call = self._call(
            inputs_embeds, attention_mask, trailing_text_hidden, tts_pad_embed.reshape(-1),
            sampling, options or _ROW_OPTIONS.get() or RowOptions(),
        )  # fmt: skip
        if not call.done.is_set():
            self._submit(call)
            call.done.wait()
        if call.error is not None:
            raise call.error
        return self._codes(call, inputs_embeds.device)

    def _call(
        self,
        embeds: torch.Tensor,
        mask: torch.Tensor,
        text: torch.Tensor,
        pad: torch.Tensor,
        sampling: TalkerSampling,
        options: RowOptions,
    ) -> _Call:
        rows = mask.shape[0]
        seeds = list(options.seeds or [None] * rows)
        caps = list(options.frame_caps or [None] * rows)
        if len(seeds) != rows or len(caps) != rows:
            raise ValueError(f"options give {len(seeds)} seeds and {len(caps)} caps for {rows}")
        if text.shape[1] >= _MAX_TEXT:
            raise ValueError(f"a row's text has {text.shape[1]} tokens; the limit is {_MAX_TEXT}")
        call = _Call(stop=options.stop, first_frames=options.first_frames, capped=options.capped)
        for index in range(rows):
            prompt = embeds[index][mask[index].bool()]
            room = self.max_positions - prompt.shape[0] - 1
            if room < 1:
                raise ValueError(
                    f"a prompt of {prompt.shape[0]} positions leaves no room for frames "
                    f"(the loop has {self.max_positions} per row)"
                )
            cap = caps[index]
            limit = min(sampling.max_new_tokens - 1, room)
            capped = cap is not None and cap < limit
            if cap is not None and capped:
                limit = cap
            seed = seeds[index]
            call.rows.append(
                _Row(
                    call=call,
                    embeds=prompt,
                    text=text[index],
                    pad=pad,
                    sampling=sampling,
                    seed=secrets.randbits(63) if seed is None else seed,
                    limit=limit,
                    capped=capped,
                )
            )
        for row in call.rows:
            if row.limit <= 0:
                row.ended, row.length = True, 0
        call.row_ended()  # done at once when no row may run a frame
        return call

    def _codes(self, call: _Call, device: torch.device) -> torch.Tensor:
        """Each row's kept frames, padded with end-token frames to the longest."""
        groups = self.talker.config.num_code_groups
        kept = [row.codes() if row.length else None for row in call.rows]
        frames = max((len(codes) for codes in kept if codes is not None), default=0)
        out = torch.zeros(len(call.rows), frames, groups, dtype=torch.long)
        out[..., 0] = self._eos
        for index, codes in enumerate(kept):
            if codes is not None:
                out[index, : len(codes)] = codes
        return out.to(device)

    def _submit(self, call: _Call) -> None:
        with self._cond:
            self._waiting.extend(row for row in call.rows if not row.ended)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._serve, name="fastgen-loop", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    # The loop (its own thread) --------------------------------------------------------------

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._slots and not self._waiting:
                    self._cond.wait()
            with self._device, torch.inference_mode():
                try:
                    self._cycle()
                except Exception as exc:  # the loop outlives any one batch's failure
                    self._fail_everything(exc)

    def _cycle(self) -> None:
        """Drop stopped callers' rows, admit waiting rows, run a window of frames, retire."""
        self._drop_stopped()
        self._admit()
        if self._slots:
            codes, bad = self._run_window()
            self._retire(codes, bad)

    def _drop_stopped(self) -> None:
        with self._cond:
            calls = {row.call: None for row in (*self._slots, *self._waiting)}
        for call in calls:
            reason = _callback(call.stop) if call.stop is not None else None
            if reason is not None:
                self.stats.rows_stopped += sum(not row.ended for row in call.rows)
                call.fail(GenerationStopped(reason))
        with self._cond:
            self._waiting = deque(row for row in self._waiting if not row.ended)
        self._compact()

    def _admit(self) -> None:
        with self._cond:
            free = self.max_rows - len(self._slots)
            newcomers = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
        for row in newcomers:
            self._slots.append(row)
            self._prefill(len(self._slots) - 1, row)
            self.stats.rows += 1

    def _prefill(self, slot: int, row: _Row) -> None:
        """Run the row's prompt through the talker into its slot's cache and choose its first
        token. Alone, unpadded: the row's numbers do not depend on who else is admitted."""
        ws = self._workspace
        ws.load_row(slot, row)
        length = row.embeds.shape[0]
        device = ws.token.device
        mask = torch.ones(1, length, dtype=torch.long, device=device)
        positions, deltas = self.talker.get_rope_index(mask)
        ws.rope_delta[slot] = deltas.flatten()[0]
        attend = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        cache_position = torch.arange(length, device=device)
        rows = slice(slot, slot + 1)
        with self._grouped_attention():
            hidden = self._talker_layers(
                ws, rows, row.embeds[None], positions, attend[None, None], cache_position,
                length, per_row=False,
            )  # fmt: skip
        ws.hidden[rows] = hidden[:, -1]
        logits = self.talker.codec_head(hidden[:, -1]).float()
        generated = torch.zeros(1, dtype=torch.long, device=device)
        self._choose_token(ws, rows, logits, generated, row.sampling.wide)

    def _run_window(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Up to `check_every` frames for the live rows, fewer when a row arrives for a free
        slot (so it joins a frame later, not a window later); their codes and non-finite
        flags, copied to the host once."""
        ws, slots = self._workspace, self._slots
        bucket = batch_bucket(len(slots))
        self.stats.largest_batch = max(self.stats.largest_batch, len(slots))
        frames = min(self.check_every, max(row.limit - row.count for row in slots))
        furthest = max(row.embeds.shape[0] + row.count for row in slots) + frames
        length = min(_round_up(furthest + 1, self.kv_step), ws.positions)
        wide = any(row.sampling.wide for row in slots)
        sub_wide = any(row.sampling.sub_wide for row in slots)
        predict, talk = self._steps
        recorded = []
        with self._grouped_attention():
            for _ in range(frames):
                self._graphs.run(("codes", bucket, sub_wide), lambda: predict(ws, bucket, sub_wide))
                self._graphs.run(
                    ("talker", bucket, length, wide), lambda: talk(ws, bucket, length, wide)
                )
                recorded.append(ws.frame[:bucket].clone())
                if self._waiting and len(slots) < self.max_rows:  # read without the lock: a hint
                    break
        return torch.stack(recorded, dim=1).cpu(), ws.bad[:bucket].cpu()

    def _retire(self, codes: torch.Tensor, bad: torch.Tensor) -> None:
        for slot, row in enumerate(self._slots):
            if row.ended:  # its caller failed meanwhile
                continue
            if bad[slot]:
                self.stats.rows_non_finite += 1
                row.call.fail(RuntimeError("the model's logits turned non-finite (NaN)"))
                self._workspace.cache.zero_row(slot)  # its NaNs must not outlive it
                continue
            if row.call.first_frames is not None:
                _callback(row.call.first_frames)
                row.call.first_frames = None
            row.take(codes[slot], self._eos)
            if row.ended:
                if row.capped and row.length == row.limit:
                    self.stats.rows_capped += 1
                    logger.warning("A row never ended; cut at its cap of %d frames", row.limit)
                    if row.call.capped is not None:
                        _callback(partial(row.call.capped, row.call.rows.index(row)))
                row.call.row_ended()
        self._compact()

    def _compact(self) -> None:
        """Move the live rows to the front, in order, so the batch bucket shrinks."""
        keep = [slot for slot, row in enumerate(self._slots) if not row.ended]
        if len(keep) == len(self._slots):
            return
        kept = [self._slots[slot] for slot in keep]
        if keep != list(range(len(keep))):
            used = max(row.embeds.shape[0] + row.count + 1 for row in kept)
            index = torch.tensor(keep, device=self._workspace.token.device)
            self._workspace.keep_rows(index, min(used, self._workspace.positions))
        idle = slice(len(kept), len(self._slots))
        self._workspace.finished[idle] = True  # rows that left: idle from now on
        self._workspace.position[idle] = 0
        self._workspace.valid[idle, 0] = True
        self._slots = kept

    def _fail_everything(self, error: BaseException) -> None:
        with self._cond:
            rows, self._waiting = [*self._slots, *self._waiting], deque()
        for call in {row.call: None for row in rows}:
            call.fail(error)
        self._slots = []
        self._workspace.clear()

    # The model's computation ----------------------------------------------------------------

    @contextmanager
    def _grouped_attention(self) -> Iterator[None]:
        """Within: the layers' sdpa attention is `_grouped_sdpa` (the talker's config passes
        the setting on to the code predictor's). Only the loop runs the talker's layers."""
        config = self.talker.config
        if config._attn_implementation != "sdpa":
            yield
            return
        config._attn_implementation = _GROUPED_SDPA
        try:
            yield
        finally:
            config._attn_implementation = "sdpa"

    def _talker_layers(
        self,
        ws: _Workspace,
        rows: slice,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        attend: torch.Tensor,
        cache_position: torch.Tensor,
        length: int,
        *,
        per_row: bool,
    ) -> torch.Tensor:
        """The talker decoder (Qwen3TTSTalkerModel.forward without its mask and cache setup)."""
        model = self.talker.model
        ws.cache.select(rows, length, per_row)
        embeddings = model.rotary_emb(embeds, positions)
        mask = self._mask(attend, embeds.dtype)
        return _decoder(model, embeds, mask, ws.cache, cache_position, embeddings)

    def _mask(self, attend: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """sdpa takes the boolean mask; eager attention adds it to the scores."""
        if not self._eager_mask:
            return attend
        return torch.zeros(attend.shape, dtype=dtype, device=attend.device).masked_fill(
            ~attend, torch.finfo(dtype).min
        )

    def _predict_codes(self, ws: _Workspace, bucket: int, wide: bool) -> None:
        """Codebooks 1..G-1 for the current token, mirroring the code predictor's `forward`:
        step 0 reads [talker hidden, token embedding], step i the embedding of code i-1 (its
        table i-1), and lm_head[i] scores code i. Writes ws.frame and ws.frame_embed."""
        predictor = self.talker.code_predictor
        tables = predictor.model.codec_embedding
        rows = slice(0, bucket)
        first = self.talker.model.codec_embedding(ws.token[rows])
        inputs = torch.stack((ws.hidden[rows], first), dim=1)
        codes, embeds = [], [first]
        ws.cp_cache.select(rows, ws.cp_positions.shape[0], per_row=False)
        for index, head in enumerate(predictor.lm_head):
            if index:
                inputs = embeds[-1][:, None]
            start = 0 if index == 0 else index + 1
            positions = ws.cp_positions[start : index + 2]
            hidden = self._predictor_layers(
                ws, bucket, predictor.small_to_mtp_projection(inputs), positions
            )
            logits = head(hidden[:, -1]).float()
            ws.bad[rows] |= logits.isnan().any(dim=-1)
            code = _choose(
                logits,
                ws.sub_do_sample[rows],
                ws.sub_temperature[rows],
                ws.sub_top_k[rows],
                ws.sub_top_p[rows],
                noise=(ws.seed_lo[rows], ws.seed_hi[rows], ws.step[rows] * _STAGES + index + 1),
                wide=wide,
            )
            embed = tables[index](code)
            embeds.append(embed)
            codes.append(code)
        ws.frame[rows, 0] = ws.token[rows]
        ws.frame[rows, 1:] = torch.stack(codes, dim=1)
        # Summed as one stacked reduction, like the stock forward, so the floats agree exactly.
        ws.frame_embed[rows] = torch.stack(embeds, dim=1).sum(1)

    def _predictor_layers(
        self, ws: _Workspace, bucket: int, inputs: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        model = self.talker.code_predictor.model
        attend = ws.cp_causal[positions][None, None]
        embeddings = model.rotary_emb(inputs, positions[None].expand(bucket, -1))
        mask = self._mask(attend, inputs.dtype)
        return _decoder(model, inputs, mask, ws.cp_cache, positions, embeddings)

    def _talker_step(self, ws: _Workspace, bucket: int, length: int, wide: bool) -> None:
        """Feed each row its frame (its codes' embeddings plus the row's next text token, or
        the pad embedding once the text is read) and choose its next token; advances the
        row's step, and its position while it runs."""
        rows = slice(0, bucket)
        step, position = ws.step[rows], ws.position[rows]
        cursor = step.clamp(max=ws.text_len - 1)[:, None, None].expand(-1, 1, ws.text.shape[2])
        text = ws.text[rows].gather(1, cursor)[:, 0]
        embeds = (ws.frame_embed[rows] + text)[:, None]
        ws.valid[ws.cache.row_ids[:bucket], position] = True
        positions = (position + ws.rope_delta[rows])[None, :, None].expand(3, -1, -1)
        attend = ws.valid[rows, None, None, :length]
        hidden = self._talker_layers(
            ws, rows, embeds, positions, attend, position, length, per_row=True
        )
        ws.hidden[rows] = hidden[:, -1]
        logits = self.talker.codec_head(hidden[:, -1]).float()
        self._choose_token(ws, rows, logits, step + 1, wide)
        step.add_(1)
        position.add_((~ws.finished[rows]).long())

    def _choose_token(
        self,
        ws: _Workspace,
        rows: slice,
        logits: torch.Tensor,
        generated: torch.Tensor,
        wide: bool,
    ) -> None:
        """The stock processors in transformers' order (sequence bias, repetition penalty,
        minimum length, suppressed tokens; bias and suppression share one vector), then the
        choice. Finished rows keep emitting the end token; a row ends at the end token, at its
        frame limit, or when its logits turn non-finite."""
        eos = self._eos
        logits = logits + ws.bias[rows]
        seen = ws.seen[rows]
        penalty = ws.penalty[rows, None]
        penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
        logits = torch.where(seen, penalised, logits)
        too_early = generated < ws.min_new[rows]
        logits[:, eos] = torch.where(too_early, -math.inf, logits[:, eos])
        bad = ws.bad[rows]
        bad |= logits.isnan().any(dim=-1)
        token = _choose(
            logits,
            ws.do_sample[rows],
            ws.temperature[rows],
            ws.top_k[rows],
            ws.top_p[rows],
            noise=(ws.seed_lo[rows], ws.seed_hi[rows], generated * _STAGES),
            wide=wide,
        )
        finished = ws.finished[rows]
        token = torch.where(finished, eos, token)
        finished |= (token == eos) | (generated >= ws.limit[rows]) | bad
        seen.scatter_(1, token[:, None], True)
        ws.token[rows] = token


def _callback(function: Callable[[], Any]) -> Any:
    """A caller's callback, run on the loop's thread: its failure is logged, never the loop's
    (which would fail every call in the batch)."""
    try:
        return function()
    except Exception:
        logger.exception("A generation callback failed")
        return None


def _grouped_sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """sdpa for a single query position that reads the cache as it is: the query heads
    sharing a key/value head become the rows of one query block, where transformers' sdpa would
    first copy every key and value once per query head (it does so whenever a mask is given).
    Longer queries (prefills) take transformers' path."""
    rows, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    if length != 1 or heads == kv_heads:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    grouped = query.view(rows, kv_heads, heads // kv_heads, dim)  # head h = g * (heads/kv) + r
    out = torch.nn.functional.scaled_dot_product_attention(
        grouped, key, value, attn_mask=attention_mask, scale=scaling
    )
    return out.view(rows, heads, 1, dim).transpose(1, 2).contiguous(), None


AttentionInterface.register(_GROUPED_SDPA, _grouped_sdpa)


def _choose(
    logits: torch.Tensor,
    do_sample: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    *,
    noise: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    wide: bool,
) -> torch.Tensor:
    """Per row: greedy, or sampling after temperature, top-k (0: off) and top-p (1: off), all
    on the device. A narrow step looks at the best `_TOP_K_WIDTH` candidates through `topk`;
    a wide one (a row has top-k off or larger) at the whole vocabulary. Sampling is the
    exponential race (argmax of p / E, E ~ Exp(1)) with E hashed from the row's seed, the
    counter and the token id (`noise`), so a row's draws depend on nothing else."""
    greedy = logits.argmax(dim=-1)
    width = logits.shape[-1] if wide else min(_TOP_K_WIDTH, logits.shape[-1])
    values, ids = (logits / temperature[:, None]).topk(width, dim=-1)
    rank = torch.arange(width, device=logits.device)
    keep = torch.where(top_k > 0, top_k, width)[:, None]
    values = values.masked_fill(rank >= keep, -math.inf)
    probs = values.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the better-ranked tokens
    values = values.masked_fill((before >= top_p[:, None]) & (top_p[:, None] < 1), -math.inf)
    seed_lo, seed_hi, counter = noise
    race = values - _exponential(seed_lo, seed_hi, counter, ids).log()
    sampled = ids.gather(-1, race.argmax(dim=-1, keepdim=True)).squeeze(-1)
    return torch.where(do_sample, sampled, greedy)


_M32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (xor-shift-multiply rounds), in int64: values stay below 2**32 and
    multipliers below 2**31, so no product overflows."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x68E31DA5) & _M32
    return x ^ (x >> 16)


def _exponential(
    seed_lo: torch.Tensor, seed_hi: torch.Tensor, counter: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """Exp(1) draws, one per (row, candidate), from a hash of (seed, counter, token id)."""
    key = _hash32(seed_lo ^ _hash32(seed_hi ^ _hash32(counter & _M32)))
    bits = _hash32((ids + key[:, None]) & _M32)
    uniform = ((bits >> 8).float() + 0.5) * 2.0**-24  # in (0, 1): no log of 0 or 1
    return -uniform.log()


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _decoder(
    model: Qwen3TTSTalkerModel | Qwen3TTSTalkerCodePredictorModel,
    hidden: torch.Tensor,
    mask: torch.Tensor,
    cache: _StaticCache,
    cache_position: torch.Tensor,
    embeddings: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """A Qwen3-style decoder's layers and final norm over a static cache (the talker's and the
    code predictor's `forward` without their mask and cache setup)."""
    for layer in model.layers:
        hidden = layer(
            hidden,
            attention_mask=mask,
            past_key_values=cache,
            cache_position=cache_position,
            position_embeddings=embeddings,
        )[0]
    return model.norm(hidden)


def _round_up(value: int, step: int) -> int:
    return math.ceil(value / step) * step
