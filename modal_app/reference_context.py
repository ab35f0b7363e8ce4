"""qwen-tts's voice-clone generation with a bounded share of the reference in its decode.

qwen-tts's `generate_voice_clone` decodes `cat([reference codes, generated codes])` for every
call in ICL mode (a transcript given) and then cuts the reference's share of the audio, so
every call pays to decode its whole reference again: a 10 s reference is 125 frames, often more
than the speech it precedes. The decoder is causal and looks back a bounded distance; qwen-tts's
own `chunked_decode` decodes long code sequences in chunks with only `REFERENCE_CONTEXT_FRAMES`
of left context, the model authors' judgement of what the decoder needs. So here only the
reference's last frames are decoded before the generated ones, and exactly their samples are
cut (by frame count): the decode costs the same whatever the reference's length, and the audio
is close to the full decode's (docs/gpu-service.md gives the measured difference). x-vector-only
prompts (no transcript) have no reference codes and decode only their own, as before.
"""

from typing import Any, TypeVar, cast

import numpy as np
import torch
from qwen_tts import Qwen3TTSModel
from qwen_tts.inference.qwen3_tts_model import VoiceClonePromptItem
from qwen_tts.inference.qwen3_tts_tokenizer import Qwen3TTSTokenizer

__all__ = [
    "REFERENCE_CONTEXT_FRAMES",
    "decode_after_reference",
    "generate_voice_clone",
    "speech_codec",
    "speech_tokenizer",
]

# qwen-tts's `left_context_size` (Qwen3TTSTokenizerV2Decoder.chunked_decode): the frames of
# left context its decoder is given before a chunk of codes.
REFERENCE_CONTEXT_FRAMES = 25

_T = TypeVar("_T")


def generate_voice_clone(
    tts: Qwen3TTSModel,
    *,
    text: str | list[str],
    language: str | list[str] | None = None,
    voice_clone_prompt: list[VoiceClonePromptItem],
    **kwargs: Any,
) -> tuple[list[np.ndarray], int]:
    """`tts.generate_voice_clone` with prompt items (one, or one per text): its prompt building
    and generation unchanged, its decode `decode_after_reference`."""
    texts = tts._ensure_list(text)
    languages = _per_text(language or "Auto", len(texts), "language")
    items = _per_text(voice_clone_prompt, len(texts), "prompt")
    tts._validate_languages(languages)
    reference_ids = [
        tts._tokenize_texts([tts._build_ref_text(item.ref_text)])[0] if item.ref_text else None
        for item in items
    ]
    # qwen-tts annotates `ref_ids` as tensors only and `voice_clone_prompt` as a list, but its
    # own `generate_voice_clone` passes None entries and this dict, which `generate` reads.
    codes, _ = tts.model.generate(
        input_ids=tts._tokenize_texts([tts._build_assistant_text(line) for line in texts]),
        ref_ids=reference_ids,  # pyright: ignore[reportArgumentType]
        voice_clone_prompt=tts._prompt_items_to_voice_clone_prompt(items),  # pyright: ignore[reportArgumentType]
        languages=languages,
        non_streaming_mode=False,
        **tts._merge_generate_kwargs(**kwargs),
    )
    references = [item.ref_code for item in items]
    return decode_after_reference(speech_tokenizer(tts), codes, references)


def speech_tokenizer(tts: Qwen3TTSModel) -> Qwen3TTSTokenizer:
    """The model's speech tokenizer (`from_pretrained` loads it with the model)."""
    tokenizer = tts.model.speech_tokenizer
    if tokenizer is None:
        raise ValueError("the model has no speech tokenizer loaded")
    return tokenizer


def speech_codec(tts: Qwen3TTSModel) -> torch.nn.Module:
    """The speech tokenizer's network (its `from_pretrained` sets what `__init__` sets to None,
    so pyright reads the attribute as None only)."""
    return cast(torch.nn.Module, speech_tokenizer(tts).model)


def _per_text(value: _T | list[_T], count: int, name: str) -> list[_T]:
    """One value per text, as qwen-tts spreads a single one."""
    values = value if isinstance(value, list) else [value]
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise ValueError(f"Batch size mismatch: {name}={len(values)}, text={count}")
    return values


def decode_after_reference(
    tokenizer: Qwen3TTSTokenizer,
    codes: list[torch.Tensor],
    references: list[torch.Tensor | None],
    context_frames: int = REFERENCE_CONTEXT_FRAMES,
) -> tuple[list[np.ndarray], int]:
    """Each of `codes` (frames x code groups) decoded after the last `context_frames` of its
    reference's codes (None: none), whose samples are then cut; and the sample rate."""
    contexts = [
        None if reference is None else reference[max(0, len(reference) - context_frames) :]
        for reference in references
    ]
    items = [
        {"audio_codes": chunk if context is None else torch.cat([context.to(chunk.device), chunk])}
        for chunk, context in zip(codes, contexts, strict=True)
    ]
    waves, sample_rate = tokenizer.decode(items)
    per_frame = tokenizer.get_decode_upsample_rate()
    cuts = [0 if context is None else len(context) * per_frame for context in contexts]
    return [wave[cut:] for wave, cut in zip(waves, cuts, strict=True)], sample_rate
