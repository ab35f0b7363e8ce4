"""A faster talker generation loop for Qwen3-TTS, with the inputs and outputs of the stock one.

qwen-tts builds the talker's prompt (text, speaker embedding, reference codes) and then calls
`talker.generate`, transformers' generic loop: a growing KV cache, a `code_predictor.generate`
call per frame, logits processors and a host synchronisation every step. `FastTalker` replaces
only that call and runs the model's own layers and weights with:

- static KV caches for the talker and the code predictor (preallocated, written in place);
- per 12.5 Hz frame, the code predictor's loop (codebooks 1..15) and the talker's decode step as
  two functions that touch only static tensors, captured as CUDA graphs per batch-size bucket
  (and per attention-length bucket for the talker) when the model is on a CUDA device;
- sampling on the device (temperature, top-k, top-p, repetition penalty, the end token held back
  for the first frames), and a look at the finished rows only every few frames;
- batched rows that stop independently: a finished row emits the end token, and once the live
  rows fit a smaller bucket they are moved to the front so finished rows stop costing.

On a CPU the same code runs without graph capture, which is how the tests compare it with the
stock loop. `FastTalker.installed()` routes qwen-tts's own `generate_voice_clone` through it, so
prompt building, trimming at the end token and the batched speech-tokenizer decode stay theirs.
"""

import math
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

__all__ = ["FastTalker", "TalkerSampling", "batch_bucket", "stock_talker_kwargs"]

_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
_KV_STEP = 256  # attention-length bucket: graphs attend over a multiple of this many positions
_GROUPED_SDPA = "fastgen_grouped_sdpa"  # our attention function's name in transformers' registry
_INITIAL_FRAMES = 512  # KV room at first (41 s of audio); it doubles when a generation needs more
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
    def graph_constants(self) -> tuple[bool, bool, int, int]:
        """The settings a captured step holds as constants (the others live in tensors)."""
        return (self.do_sample, self.subtalker_dosample, self.min_new_tokens, self.eos_token_id)

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

    Implements the one method the qwen-tts attention layers call on a cache. `rows` and
    `length` select the views the current step uses; the storage never moves, which is what
    lets a captured graph be replayed."""

    def __init__(self, layers: int, rows: int, heads: int, positions: int, head_dim: int, **kw):
        shape = (rows, heads, positions, head_dim)
        self.keys = [torch.zeros(shape, **kw) for _ in range(layers)]
        self.values = [torch.zeros(shape, **kw) for _ in range(layers)]
        self.rows = rows
        self.length = positions

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, cache_kwargs: dict
    ) -> tuple[torch.Tensor, torch.Tensor]:
        position = cache_kwargs["cache_position"]
        keys = self.keys[layer_idx][: self.rows]
        values = self.values[layer_idx][: self.rows]
        keys.index_copy_(2, position, key)
        values.index_copy_(2, position, value)
        return keys[:, :, : self.length], values[:, :, : self.length]

    def keep_rows(self, index: torch.Tensor, positions: int) -> None:
        """Move the rows `index` to the front (only the first `positions` are in use)."""
        for tensor in (*self.keys, *self.values):
            tensor[: len(index), :, :positions] = tensor[index, :, :positions]

    def copy_from(self, other: "_StaticCache") -> None:
        """Take over a smaller cache's contents (same layers and heads)."""
        for mine, theirs in zip(
            (*self.keys, *self.values), (*other.keys, *other.values), strict=True
        ):
            _copy_prefix(mine, theirs)


class _GraphRunner:
    """Runs a step function eagerly the first time it sees a key (warm-up, doing the real
    work), then captures it as a CUDA graph and replays it from then on. Disabled: always eager.

    A captured function must read and write only tensors whose storage outlives the graph."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._graphs: dict[Hashable, torch.cuda.CUDAGraph] = {}
        self._warmed: set[Hashable] = set()
        self._pool: Any = None

    def run(self, key: Hashable, step: Callable[[], None]) -> None:
        graph = self._graphs.get(key)
        if graph is not None:
            graph.replay()
        elif not self.enabled or key not in self._warmed:
            step()
            self._warmed.add(key)
        else:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                step()  # recorded, not executed
            self._pool = self._pool or graph.pool()
            self._graphs[key] = graph
            graph.replay()

    def clear(self) -> None:
        self._graphs.clear()
        self._warmed.clear()
        self._pool = None


class _Workspace:
    """Every tensor a frame step reads or writes, sized for `rows` rows and `positions`
    talker positions. Steps work on the first `b` rows (the current batch bucket)."""

    def __init__(self, talker: nn.Module, rows: int, positions: int, text_len: int) -> None:
        config = talker.config
        cp_config = config.code_predictor_config
        param = next(talker.parameters())
        dev, dtype = param.device, param.dtype
        kw = {"device": dev, "dtype": dtype}
        groups = config.num_code_groups
        self.rows, self.positions, self.text_len = rows, positions, text_len
        self.cache = _StaticCache(
            config.num_hidden_layers,
            rows,
            config.num_key_value_heads,
            positions,
            _head_dim(config),
            **kw,
        )
        self.cp_cache = _StaticCache(
            cp_config.num_hidden_layers,
            rows,
            cp_config.num_key_value_heads,
            groups,
            _head_dim(cp_config),
            **kw,
        )
        self.valid = torch.zeros(rows, positions, dtype=torch.bool, device=dev)
        self.token = torch.zeros(rows, dtype=torch.long, device=dev)
        self.hidden = torch.zeros(rows, config.hidden_size, **kw)
        self.finished = torch.ones(rows, dtype=torch.bool, device=dev)
        self.seen = torch.zeros(rows, config.vocab_size, dtype=torch.bool, device=dev)
        self.rope_delta = torch.zeros(rows, dtype=torch.long, device=dev)
        self.text = torch.zeros(rows, text_len, config.hidden_size, **kw)
        self.text_pad = torch.zeros(config.hidden_size, **kw)
        self.text_used = torch.zeros((), dtype=torch.long, device=dev)  # this call's text length
        self.frame = torch.zeros(rows, groups, dtype=torch.long, device=dev)
        self.frame_embed = torch.zeros(rows, config.hidden_size, **kw)
        self.step = torch.zeros(1, dtype=torch.long, device=dev)  # frames done
        self.position = torch.zeros(1, dtype=torch.long, device=dev)  # next talker position
        self.cp_positions = torch.arange(groups, device=dev)
        self.cp_causal = torch.ones(groups, groups, dtype=torch.bool, device=dev).tril()
        self.bias = torch.zeros(config.vocab_size, dtype=torch.float32, device=dev)
        scalars = ("temperature", "top_p", "penalty", "sub_temperature", "sub_top_p")
        self.scalars = {name: torch.ones((), device=dev) for name in scalars}
        self.top_k = torch.zeros((), dtype=torch.long, device=dev)
        self.sub_top_k = torch.zeros((), dtype=torch.long, device=dev)

    def fits(self, rows: int, positions: int, text_len: int) -> bool:
        return rows <= self.rows and positions <= self.positions and text_len <= self.text_len

    def copy_from(self, other: "_Workspace") -> None:
        """Take over a smaller workspace's state mid-generation (when it runs out of room)."""
        for name, mine in vars(self).items():
            theirs = getattr(other, name)
            if isinstance(mine, _StaticCache):
                mine.copy_from(theirs)
            elif isinstance(mine, torch.Tensor):
                _copy_prefix(mine, theirs)
            elif isinstance(mine, dict):
                for key, tensor in mine.items():
                    tensor.copy_(theirs[key])

    def load_sampling(self, sampling: TalkerSampling) -> None:
        """Copy this call's sampling settings into the tensors the captured steps read."""
        values = {
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "penalty": sampling.repetition_penalty,
            "sub_temperature": sampling.subtalker_temperature,
            "sub_top_p": sampling.subtalker_top_p,
        }
        for name, value in values.items():
            self.scalars[name].fill_(value)
        self.top_k.fill_(sampling.top_k)
        self.sub_top_k.fill_(sampling.subtalker_top_k)
        self.bias.zero_()
        for token, bias in sampling.token_bias:
            self.bias[token] += bias
        if sampling.suppress_tokens:
            self.bias[list(sampling.suppress_tokens)] = -math.inf

    def keep_rows(self, index: torch.Tensor, live: int) -> None:
        """Move rows `index` to the front; rows past `live` are padding and count as finished."""
        used = int(self.position.item())
        self.cache.keep_rows(index, used)
        for tensor in (self.token, self.hidden, self.finished, self.seen, self.rope_delta):
            tensor[: len(index)] = tensor[index]
        self.valid[: len(index), :used] = self.valid[index, :used]
        self.text[: len(index)] = self.text[index]
        self.finished[live : len(index)] = True


class FastTalker:
    """Generates the talker's codes for a left-padded batch of prompts.

    `cuda_graphs` None: capture when the model is on a CUDA device. `check_every`: frames
    between looks at which rows have finished (each look waits for the device). `kv_step` and
    `initial_frames` size the talker's KV cache (tests make them small to exercise growth)."""

    def __init__(
        self,
        talker: nn.Module,
        *,
        cuda_graphs: bool | None = None,
        check_every: int = 8,
        kv_step: int = _KV_STEP,
        initial_frames: int = _INITIAL_FRAMES,
    ) -> None:
        implementation = talker.config._attn_implementation
        if implementation not in ("sdpa", "eager"):
            raise ValueError(f"fast generation needs sdpa or eager attention, not {implementation}")
        if getattr(talker.config, "sliding_window", None) is not None:
            raise ValueError("fast generation does not support sliding-window attention")
        self.talker = talker
        self.check_every = max(1, check_every)
        self.kv_step, self.initial_frames = kv_step, initial_frames
        self._cuda_graphs = cuda_graphs
        self._eager_mask = implementation == "eager"
        self._workspace: _Workspace | None = None
        self._graphs = _GraphRunner(False)

    def reset(self) -> None:
        """Drop buffers and graphs, e.g. after the model moved to another device."""
        self._workspace = None
        self._graphs.clear()

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Within: the talker's `generate` is this loop (qwen-tts calls it from its own
        generate methods). Not thread-safe; the engine holds its lock around it."""
        self.talker.generate = self.generate_like_stock
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
    def generate(self, **kwargs: Any) -> torch.Tensor:
        """Codes shaped (rows, frames, code groups) for `talker.generate`'s arguments. After
        a row's end token, its first codebook holds the end token (as in the stock loop, whose
        caller cuts there)."""
        with self._grouped_attention():
            return self._generate(**kwargs)

    @contextmanager
    def _grouped_attention(self) -> Iterator[None]:
        """Within: the layers' sdpa attention is `_grouped_sdpa` (the talker's config passes
        the setting on to the code predictor's)."""
        config = self.talker.config
        if config._attn_implementation != "sdpa":
            yield
            return
        config._attn_implementation = _GROUPED_SDPA
        try:
            yield
        finally:
            config._attn_implementation = "sdpa"

    def _generate(
        self,
        *,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        trailing_text_hidden: torch.Tensor,
        tts_pad_embed: torch.Tensor,
        **kwargs: Any,
    ) -> torch.Tensor:
        sampling = TalkerSampling.from_generate_kwargs(kwargs, self.talker.generation_config)
        rows, prompt_len = attention_mask.shape
        frames = max(sampling.max_new_tokens - 1, 0)
        bucket = batch_bucket(rows)
        room = prompt_len + min(frames, self.initial_frames) + 1
        ws = self._workspace_for(bucket, room, trailing_text_hidden.shape[1])
        ws.load_sampling(sampling)
        logits = self._prefill(ws, bucket, inputs_embeds, attention_mask, trailing_text_hidden)
        ws.text_pad.copy_(tts_pad_embed.reshape(-1))
        self._choose_token(ws, bucket, logits, sampling, generated=torch.zeros_like(ws.step))
        slots = torch.full((bucket,), -1, dtype=torch.long)
        slots[:rows] = torch.arange(rows)
        segments: list[tuple[torch.Tensor, list[torch.Tensor]]] = [(slots, [])]
        for frame in range(frames):
            if frame % self.check_every == 0:
                if frame:
                    live = torch.nonzero(~ws.finished[:bucket].cpu()).flatten()
                    if len(live) == 0:
                        break
                    if batch_bucket(len(live)) < bucket:
                        bucket, slots = self._compact(ws, live, slots)
                        segments.append((slots, []))
                room = prompt_len + min(frame + self.check_every, frames) + 1
                ws = self._workspace_for(bucket, room, ws.text_len, keep_state=True)
            self._frame(ws, bucket, prompt_len + frame, sampling)
            segments[-1][1].append(ws.frame[:bucket].clone())
        return _assemble(segments, rows, ws.frame.shape[1], sampling.eos_token_id)

    def _workspace_for(
        self, bucket: int, positions: int, text_len: int, *, keep_state: bool = False
    ) -> _Workspace:
        """The workspace, replaced by a larger one when it lacks rows, positions or text room
        (graphs are dropped: they point into the old buffers). `keep_state`: carry a running
        generation over."""
        positions = _round_up(positions, self.kv_step)
        text_len = _round_up(max(text_len, 1), 64)
        old = self._workspace
        if old is not None and old.fits(bucket, positions, text_len):
            return old
        self._graphs.clear()
        if old is None:
            ws = _Workspace(self.talker, bucket, positions, text_len)
        else:
            if positions > old.positions:  # at least double, so this happens rarely
                positions = max(positions, 2 * old.positions)
            ws = _Workspace(
                self.talker,
                max(bucket, old.rows),
                max(positions, old.positions),
                max(text_len, old.text_len),
            )
            if keep_state:
                ws.copy_from(old)
        self._workspace = ws
        enabled = self._cuda_graphs
        self._graphs.enabled = ws.token.is_cuda if enabled is None else enabled
        return ws

    def _prefill(
        self,
        ws: _Workspace,
        bucket: int,
        embeds: torch.Tensor,
        mask: torch.Tensor,
        text: torch.Tensor,
    ) -> torch.Tensor:
        """Run the prompt through the talker, filling the cache (rows past the batch copy row 0
        and count as finished); returns the logits for the first token."""
        rows, length = mask.shape
        fill = torch.zeros(bucket, dtype=torch.long, device=mask.device)
        fill[:rows] = torch.arange(rows, device=mask.device)
        embeds, mask = embeds[fill], mask[fill].bool()
        ws.valid[:bucket].zero_()
        ws.valid[:bucket, :length] = mask
        ws.text[:bucket].zero_()
        ws.text[:bucket, : text.shape[1]] = text[fill]
        ws.text_used.fill_(text.shape[1])
        ws.finished[:bucket] = True
        ws.finished[:rows] = False
        ws.seen[:bucket] = False
        ws.step.zero_()
        ws.position.fill_(length)
        # qwen-tts's rope positions for a left-padded prompt: 0.. over the real tokens, and on
        # decoding, cache position minus the row's padding (Talker.forward's rope_deltas).
        positions, deltas = self.talker.get_rope_index(mask.long())
        ws.rope_delta[:bucket] = (deltas - (~mask).sum(-1, keepdim=True)).flatten()
        causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
        # Every query also sees itself, so a padding query never has all keys masked.
        attend = (mask[:, None, :] & causal) | torch.eye(
            length, dtype=torch.bool, device=mask.device
        )
        cache_position = torch.arange(length, device=mask.device)
        hidden = self._talker_layers(
            ws, bucket, embeds, positions, attend[:, None], cache_position, length
        )
        ws.hidden[:bucket] = hidden[:, -1]
        return self.talker.codec_head(hidden[:, -1]).float()

    def _talker_layers(
        self,
        ws: _Workspace,
        bucket: int,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        attend: torch.Tensor,
        cache_position: torch.Tensor,
        length: int,
    ) -> torch.Tensor:
        """The talker decoder (Qwen3TTSTalkerModel.forward without its mask and cache setup)."""
        model = self.talker.model
        ws.cache.rows, ws.cache.length = bucket, length
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

    def _frame(self, ws: _Workspace, bucket: int, position: int, sampling: TalkerSampling) -> None:
        """One 12.5 Hz frame: the code predictor completes the current token's codes, then the
        talker reads the frame and picks the next first-codebook token."""
        modes = sampling.graph_constants
        self._graphs.run(
            ("codes", bucket, modes), lambda: self._predict_codes(ws, bucket, sampling)
        )
        length = min(_round_up(position + 1, self.kv_step), ws.positions)
        self._graphs.run(
            ("talker", bucket, length, modes),
            lambda: self._talker_step(ws, bucket, length, sampling),
        )

    def _predict_codes(self, ws: _Workspace, bucket: int, sampling: TalkerSampling) -> None:
        """Codebooks 1..G-1 for the current token, mirroring the code predictor's `forward`:
        step 0 reads [talker hidden, token embedding], step i the embedding of code i-1 (its
        table i-1), and lm_head[i] scores code i. Writes ws.frame and ws.frame_embed."""
        predictor = self.talker.code_predictor
        tables = predictor.model.codec_embedding
        first = self.talker.model.codec_embedding(ws.token[:bucket])
        inputs = torch.stack((ws.hidden[:bucket], first), dim=1)
        codes, embeds = [], [first]
        ws.cp_cache.rows = bucket
        for index, head in enumerate(predictor.lm_head):
            if index:
                inputs = embeds[-1][:, None]
            start = 0 if index == 0 else index + 1
            positions = ws.cp_positions[start : index + 2]
            hidden = self._predictor_layers(
                ws, bucket, predictor.small_to_mtp_projection(inputs), positions
            )
            logits = head(hidden[:, -1]).float()
            code = _choose(
                logits,
                sampling.subtalker_dosample,
                ws.scalars["sub_temperature"],
                ws.sub_top_k,
                ws.scalars["sub_top_p"],
            )
            embed = tables[index](code)
            embeds.append(embed)
            codes.append(code)
        ws.frame[:bucket, 0] = ws.token[:bucket]
        ws.frame[:bucket, 1:] = torch.stack(codes, dim=1)
        # Summed as one stacked reduction, like the stock forward, so the floats agree exactly.
        ws.frame_embed[:bucket] = torch.stack(embeds, dim=1).sum(1)

    def _predictor_layers(
        self, ws: _Workspace, bucket: int, inputs: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        model = self.talker.code_predictor.model
        attend = ws.cp_causal[positions][None, None]
        embeddings = model.rotary_emb(inputs, positions[None].expand(bucket, -1))
        mask = self._mask(attend, inputs.dtype)
        return _decoder(model, inputs, mask, ws.cp_cache, positions, embeddings)

    def _talker_step(
        self, ws: _Workspace, bucket: int, length: int, sampling: TalkerSampling
    ) -> None:
        """Feed the frame (its codes' embeddings plus this step's text) to the talker and
        choose the next token; advances the step and position counters on the device."""
        step = ws.step
        text_index = step.clamp(max=ws.text.shape[1] - 1)
        text = ws.text[:bucket].index_select(1, text_index)[:, 0]
        text = torch.where(step < ws.text_used, text, ws.text_pad)
        embeds = (ws.frame_embed[:bucket] + text)[:, None]
        ws.valid[:bucket].index_fill_(1, ws.position, True)
        positions = (ws.position + ws.rope_delta[:bucket])[None, :, None].expand(3, -1, -1)
        attend = ws.valid[:bucket, None, None, :length]
        hidden = self._talker_layers(ws, bucket, embeds, positions, attend, ws.position, length)
        ws.hidden[:bucket] = hidden[:, -1]
        logits = self.talker.codec_head(hidden[:, -1]).float()
        self._choose_token(ws, bucket, logits, sampling, generated=step + 1)
        step.add_(1)
        ws.position.add_(1)

    def _choose_token(
        self,
        ws: _Workspace,
        bucket: int,
        logits: torch.Tensor,
        sampling: TalkerSampling,
        generated: torch.Tensor,
    ) -> None:
        """The stock processors in transformers' order (sequence bias, repetition penalty,
        minimum length, suppressed tokens; bias and suppression share one vector), then the
        choice. Finished rows keep emitting the end token."""
        eos = sampling.eos_token_id
        logits = logits + ws.bias
        seen = ws.seen[:bucket]
        penalty = ws.scalars["penalty"]
        penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
        logits = torch.where(seen, penalised, logits)
        too_early = generated < sampling.min_new_tokens
        logits[:, eos] = torch.where(too_early, -math.inf, logits[:, eos])
        token = _choose(
            logits, sampling.do_sample, ws.scalars["temperature"], ws.top_k, ws.scalars["top_p"]
        )
        finished = ws.finished[:bucket]
        token = torch.where(finished, eos, token)
        finished |= token == eos
        seen.scatter_(1, token[:, None], True)
        ws.token[:bucket] = token

    def _compact(
        self, ws: _Workspace, live: torch.Tensor, slots: torch.Tensor
    ) -> tuple[int, torch.Tensor]:
        """Move the live rows to the front and continue with the smaller bucket."""
        bucket = batch_bucket(len(live))
        index = torch.cat([live, live[:1].expand(bucket - len(live))])
        ws.keep_rows(index.to(ws.token.device), len(live))
        kept = slots[index].clone()
        kept[len(live) :] = -1
        return bucket, kept


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
    do_sample: bool,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
) -> torch.Tensor:
    """Greedy, or sampling after temperature, top-k (0: off) and top-p (1: off), all on the
    device. Sampling uses the exponential-race form of a categorical draw (argmax of p / E,
    E ~ Exp(1)), which needs no host synchronisation and can be captured in a graph."""
    if not do_sample:
        return logits.argmax(dim=-1)
    ordered, order = (logits / temperature).sort(dim=-1, descending=True)
    rank = torch.arange(ordered.shape[-1], device=logits.device)
    keep_k = torch.where(top_k > 0, top_k, ordered.shape[-1])
    ordered = ordered.masked_fill(rank >= keep_k, -math.inf)
    probs = ordered.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the better-ranked tokens
    ordered = ordered.masked_fill((before >= top_p) & (top_p < 1), -math.inf)
    probs = ordered.softmax(dim=-1)
    pick = (probs / torch.empty_like(probs).exponential_()).argmax(dim=-1, keepdim=True)
    return order.gather(-1, pick).squeeze(-1)


def _assemble(
    segments: list[tuple[torch.Tensor, list[torch.Tensor]]], rows: int, groups: int, eos: int
) -> torch.Tensor:
    """Put each segment's frames back at their original rows; frames a row did not run
    (it had finished) read as the end token."""
    frames = [frame for _, part in segments for frame in part]
    if not frames:
        return torch.zeros(rows, 0, groups, dtype=torch.long)
    device = frames[0].device
    out = torch.zeros(rows, len(frames), groups, dtype=torch.long, device=device)
    out[..., 0] = eos
    start = 0
    for slots, part in segments:
        if not part:
            continue
        block = torch.stack(part, dim=1)
        used = slots >= 0
        out[slots[used].to(device), start : start + len(part)] = block[used.to(device)]
        start += len(part)
    return out


def _copy_prefix(target: torch.Tensor, source: torch.Tensor) -> None:
    """Copy `source` into the leading corner of the (same or larger) `target`."""
    target[tuple(slice(0, size) for size in source.shape)] = source


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _decoder(
    model: nn.Module,
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
