"""The speech tokenizer's decoder run as one TorchScript graph, without holding the GIL.

Decoding a call's codes to audio runs a few hundred small modules (codebook lookups, a small
transformer, convolutions and SnakeBeta activations up to 24 kHz). Run eagerly, every one of
their ops returns to Python and takes the GIL back, so the decodes on callers' threads take
turns with the continuous-batching loop's thread, which needs the GIL between the ops of every
frame: while calls decode, the loop's frames slow for everyone. `torch.jit.trace` records the
decoder's ops once, and a call of the recorded graph runs them all in C++ with the GIL released,
so a decode runs beside the loop instead of interleaving with it.

The graph computes exactly what the eager decoder computes, bit for bit:
- the attention masks depend on the length, so they are inputs, from `decode_masks`' cache
  (built once per shape, by transformers' own functions);
- a causal convolution pads by an amount computed in Python from the input's length; with
  stride 1, as every one in the 12 Hz decoder has, that extra padding is always 0, which is what
  the graph records (a decoder with any other stride is left eager);
- the graph executor's optimisations (its fusers) are off for these calls, so each op runs the
  kernel it runs eagerly;
- before it is used, the graph is checked against the eager decoder on lengths around the
  sliding attention window and the decode window; one that cannot be traced or that differs
  leaves the decoder eager (logged).

`torch.jit.trace` is deprecated in torch 2.11 but supported; where it fails, the eager decoder is
what serves.
"""

import logging
import types
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from qwen_tts import Qwen3TTSModel
from qwen_tts.core.tokenizer_12hz.modeling_qwen3_tts_tokenizer_v2 import (
    Qwen3TTSTokenizerV2CausalConvNet,
)
from torch.jit._fuser import optimized_execution  # torch.jit re-exports it, not in its __all__

from modal_app.decode_masks import MaskBuilder, mask_builder
from modal_app.reference_context import speech_codec

__all__ = [
    "PROBE_LENGTHS",
    "decoder_graph_installed",
    "install_decoder_graph",
    "remove_decoder_graph",
]

logger = logging.getLogger(__name__)

# Frames: one, a few, either side of the transformer's 72-frame sliding window, and the most one
# decode window holds (qwen-tts decodes 300 frames after 25 of left context).
PROBE_LENGTHS = (1, 5, 72, 73, 150, 325)
_TRACE_LENGTH = 17  # the example the graph is recorded from: any length the probes don't use


class _Decoder(torch.nn.Module):
    """`Qwen3TTSTokenizerV2Decoder.forward` with its transformer's masks as inputs."""

    def __init__(self, decoder: Any, mask_names: tuple[str, ...]) -> None:
        super().__init__()
        self.decoder = decoder
        self.mask_names = mask_names

    def forward(self, codes: torch.Tensor, *masks: torch.Tensor) -> torch.Tensor:
        decoder = self.decoder
        hidden = decoder.quantizer.decode(codes)
        hidden = decoder.pre_conv(hidden).transpose(1, 2)
        hidden = decoder.pre_transformer(
            inputs_embeds=hidden,
            attention_mask=dict(zip(self.mask_names, masks, strict=True)),
            use_cache=False,  # a single pass: the eager decode's cache is never read
        ).last_hidden_state
        hidden = hidden.permute(0, 2, 1)
        for blocks in decoder.upsample:
            for block in blocks:
                hidden = block(hidden)
        for block in decoder.decoder:
            hidden = block(hidden)
        return hidden.clamp(min=-1, max=1)


def install_decoder_graph(tts: Qwen3TTSModel) -> bool:
    """Run the speech tokenizer's decoder as a traced graph, if it traces and matches the eager
    decoder bit for bit on `PROBE_LENGTHS`; whether it does. Trace again after moving the
    model (`remove_decoder_graph` first)."""
    decoder: Any = getattr(speech_codec(tts), "decoder", None)
    transformer = getattr(decoder, "pre_transformer", None)
    if decoder is None or transformer is None:
        return False
    remove_decoder_graph(tts)
    masks = mask_builder(transformer)
    try:
        forward = _traced_forward(decoder, masks)
        mismatch = _first_mismatch(decoder, forward)
    except Exception as exc:  # an unsupported decoder: it stays eager
        logger.warning("The speech decoder stays eager: it cannot be traced (%s)", exc)
        return False
    if mismatch is not None:
        logger.warning(
            "The speech decoder stays eager: its traced graph differs at %d frames", mismatch
        )
        return False
    decoder.forward = forward
    return True


def remove_decoder_graph(tts: Qwen3TTSModel) -> None:
    """Back to the eager decoder (before moving the model to another device or dtype)."""
    decoder = getattr(speech_codec(tts), "decoder", None)
    if decoder is not None:
        decoder.__dict__.pop("forward", None)


def decoder_graph_installed(tts: Qwen3TTSModel) -> bool:
    """Whether the speech decoder runs its traced graph: its instance's own `forward`."""
    decoder = getattr(speech_codec(tts), "decoder", None)
    return decoder is not None and "forward" in decoder.__dict__


def _traced_forward(decoder: Any, masks: MaskBuilder) -> Callable[[torch.Tensor], torch.Tensor]:
    parameter = next(decoder.parameters())
    device, dtype = parameter.device, parameter.dtype
    example_masks = masks(1, _TRACE_LENGTH, dtype, device)
    if any(mask is None for mask in example_masks.values()):
        raise ValueError("the transformer takes no mask tensor (its attention builds its own)")
    names = tuple(example_masks)
    codes = torch.zeros(1, decoder.config.num_quantizers, _TRACE_LENGTH, dtype=torch.long)
    with (
        _no_extra_padding(decoder),
        torch.inference_mode(),
        warnings.catch_warnings(),
    ):
        # The tracer's warnings name Python values it records as constants: the mask names and
        # the paddings above, constant by construction.
        warnings.simplefilter("ignore")
        graph: Callable[..., torch.Tensor] = torch.jit.trace(  # pyright: ignore[reportAssignmentType]
            _Decoder(decoder, names),
            (codes.to(device), *example_masks.values()),
            check_trace=False,
        )

    def forward(codes: torch.Tensor) -> torch.Tensor:
        shape_masks = masks(codes.shape[0], codes.shape[-1], dtype, codes.device)
        with optimized_execution(False):  # per thread: no fuser changes the kernels
            return graph(codes, *(shape_masks[name] for name in names))

    return forward


def _first_mismatch(decoder: Any, forward: Callable[[torch.Tensor], torch.Tensor]) -> int | None:
    """The first probe length at which the graph's audio differs from the eager decoder's."""
    generator = torch.Generator().manual_seed(0)
    config = decoder.config
    device = next(decoder.parameters()).device
    with torch.inference_mode():
        for length in PROBE_LENGTHS:
            codes = torch.randint(
                0, config.codebook_size, (1, config.num_quantizers, length), generator=generator
            ).to(device)
            if not torch.equal(forward(codes), decoder(codes)):
                return length
    return None


@contextmanager
def _no_extra_padding(decoder: torch.nn.Module) -> Iterator[None]:
    """Within: the decoder's causal convolutions pad on the left only, as they always do with
    stride 1 (their extra right padding, computed in Python from the length, is then 0)."""
    convolutions = [
        module
        for module in decoder.modules()
        if isinstance(module, Qwen3TTSTokenizerV2CausalConvNet)
    ]
    if any(conv.stride != 1 for conv in convolutions):
        raise ValueError("a causal convolution has a stride other than 1")
    for conv in convolutions:
        conv.forward = types.MethodType(_left_padded, conv)
    try:
        yield
    finally:
        for conv in convolutions:
            conv.__dict__.pop("forward", None)


def _left_padded(self: Any, hidden: torch.Tensor) -> torch.Tensor:
    return self.conv(F.pad(hidden, (self.padding, 0), mode="constant", value=0)).contiguous()
