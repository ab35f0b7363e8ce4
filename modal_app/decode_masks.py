"""The speech tokenizer decode's attention masks, built once per shape instead of per call.

qwen-tts's 12 Hz decoder runs a small transformer over each call's codes, and transformers
builds its causal and sliding-window masks on every call (through `vmap`, in Python, holding
the GIL): about a fifth of a decode's CPU time on the tiny model, for a mask that depends only
on the batch size, the length, the dtype and the device. A forward pre-hook hands the
transformer the very masks transformers would build, from a cache, so the audio is unchanged
bit for bit and the decode stays qwen-tts's own.
"""

from functools import lru_cache, partial
from typing import Any, Protocol

import torch
from qwen_tts import Qwen3TTSModel
from torch.utils.hooks import RemovableHandle
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from modal_app.reference_context import speech_codec

# Shapes kept: a decode runs in windows of at most 325 frames, so lengths repeat; a mask is at
# most 325 x 325 booleans (sdpa) or floats (eager) for each attention type.
MAX_CACHED_SHAPES = 128

Masks = dict[str, torch.Tensor | None]


class MaskBuilder(Protocol):
    def __call__(
        self, batch: int, length: int, dtype: torch.dtype, device: torch.device
    ) -> Masks: ...


def mask_builder(transformer: torch.nn.Module) -> MaskBuilder:
    """The transformer's masks for a (batch, length, dtype, device), each built once: one cache
    per transformer, shared by the eager decoder's hook and its traced graph."""
    cached = transformer.__dict__.get("_mask_builder")
    if cached is None:
        cached = lru_cache(maxsize=MAX_CACHED_SHAPES)(partial(_build_masks, transformer))
        transformer.__dict__["_mask_builder"] = cached
    return cached


def cache_decode_masks(tts: Qwen3TTSModel) -> RemovableHandle | None:
    """Serve the speech tokenizer's decoder masks from a cache (12 Hz tokenizers; None for
    others, which have no such transformer)."""
    decoder = getattr(speech_codec(tts), "decoder", None)
    transformer = getattr(decoder, "pre_transformer", None)
    if transformer is None:
        return None
    masks = mask_builder(transformer)

    def with_cached_masks(
        _module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        # Only the call the decoder makes (embeddings alone, no cache, positions from 0):
        # anything else gets transformers' own masks.
        if args or set(kwargs) != {"inputs_embeds"}:
            return args, kwargs
        embeds = kwargs["inputs_embeds"]
        batch, length = embeds.shape[:2]
        return args, {**kwargs, "attention_mask": masks(batch, length, embeds.dtype, embeds.device)}

    return transformer.register_forward_pre_hook(with_cached_masks, with_kwargs=True)


def _build_masks(
    transformer: torch.nn.Module, batch: int, length: int, dtype: torch.dtype, device: torch.device
) -> Masks:
    """What the decoder's transformer builds for itself (its `forward`, with no attention mask
    or cache): the same functions, called with the same arguments."""
    positions = torch.arange(length, device=device)
    arguments = {
        "config": transformer.config,
        # Only the shape's batch and length, the dtype and the device are read.
        "input_embeds": torch.empty((batch, length, 0), dtype=dtype, device=device),
        "attention_mask": None,
        "cache_position": positions,
        "past_key_values": None,
        "position_ids": positions.unsqueeze(0),
    }
    masks: Masks = {"full_attention": create_causal_mask(**arguments)}
    if transformer.has_sliding_layers:
        masks["sliding_attention"] = create_sliding_window_causal_mask(**arguments)
    return masks
