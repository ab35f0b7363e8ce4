"""The speech tokenizer decode's SnakeBeta activations, with their parameters' transforms
computed once per weights instead of per call.

qwen-tts's 12 Hz decoder applies SnakeBeta, x + 1 / (exp(b) + eps) * sin(x * exp(a))^2, about
thirty times per decode, at up to 24 kHz. Each call recomputes exp(a) and 1 / (exp(b) + eps)
from the parameters and allocates a new full-size tensor for each of its five elementwise
steps: on the tiny model about a tenth of a decode's CPU time, in Python holding the GIL
against the generation loop's thread. Here the parameters' transforms are cached (keyed by the
parameters' storage and version, so moving or changing the weights recomputes them) and the
elementwise steps run in place on one tensor, in qwen-tts's order, so the audio is unchanged
bit for bit.
"""

import types
from typing import Any

import torch
from qwen_tts import Qwen3TTSModel
from qwen_tts.core.tokenizer_12hz.modeling_qwen3_tts_tokenizer_v2 import SnakeBeta

from modal_app.reference_context import speech_codec

__all__ = ["cache_snake_parameters"]


def cache_snake_parameters(tts: Qwen3TTSModel) -> int:
    """Give every SnakeBeta of the speech tokenizer the cached forward; how many there are
    (0 for tokenizers without them)."""
    snakes = [module for module in speech_codec(tts).modules() if isinstance(module, SnakeBeta)]
    for snake in snakes:
        snake.forward = types.MethodType(_forward, snake)
    return len(snakes)


def _forward(self: SnakeBeta, hidden: torch.Tensor) -> torch.Tensor:
    alpha, inverse_beta = _transformed_parameters(self)
    out = (hidden * alpha).sin_()
    out.mul_(out)  # torch.pow(x, 2) multiplies x by itself: the same floats
    return out.mul_(inverse_beta).add_(hidden)


def _transformed_parameters(snake: SnakeBeta) -> tuple[torch.Tensor, torch.Tensor]:
    """exp(alpha) and 1 / (exp(beta) + eps), shaped (1, channels, 1), for the current weights."""
    key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in (snake.alpha, snake.beta))
    cached: Any = snake.__dict__.get("_snake_cache")
    if cached is None or cached[0] != key:
        alpha = torch.exp(snake.alpha.detach()[None, :, None])
        inverse_beta = 1.0 / (torch.exp(snake.beta.detach()[None, :, None]) + snake.no_div_by_zero)
        cached = snake.__dict__["_snake_cache"] = (key, alpha, inverse_beta)
    return cached[1], cached[2]
