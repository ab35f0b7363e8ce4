"""Build a randomly initialised Qwen3-TTS (Base, 12 Hz tokenizer) for offline use.

Same architecture and files as the real checkpoints. The `tiny` shape has about 300 thousand
parameters, so the real `Qwen3TTSModel.from_pretrained` and generation code run on a CPU in
well under a second per short text: it exists for tests and for running the worker's `local`
backend without a model download. The `0.6B` and `1.7B` shapes have the published checkpoints'
sizes (talker, code predictor, speaker encoder, speech tokenizer) with random weights, for
timing on a GPU where no hub is reachable. All speak noise, not words, through a small
byte-level text tokenizer (the text embedding keeps the published vocabulary size).

    python -m modal_app.synthetic DIR [--shape tiny|0.6B|1.7B] [--device D] [--seed N]
        [--fixed-length]
"""

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
from qwen_tts.core.models import (
    Qwen3TTSConfig,
    Qwen3TTSForConditionalGeneration,
    Qwen3TTSProcessor,
)
from qwen_tts.core.tokenizer_12hz.configuration_qwen3_tts_tokenizer_v2 import (
    Qwen3TTSTokenizerV2Config,
)
from qwen_tts.core.tokenizer_12hz.modeling_qwen3_tts_tokenizer_v2 import (
    Qwen3TTSTokenizerV2Model,
)
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import EncodecFeatureExtractor, Qwen2TokenizerFast

from modal_app.languages import DEFAULT_LANGUAGE, SUPPORTED_LANGUAGES

SAMPLE_RATE = 24_000
SAMPLES_PER_FRAME = 1_920  # 12.5 Hz codec frames
CODEBOOK_SIZE = 64  # C: shared by the code predictor, the decoder and the encoder codebooks
CODE_GROUPS = 4  # codebooks per frame (the real models use 16)
HIDDEN = 32  # talker width; the speaker embedding must have the same size
OUTPUT_LEVEL = 0.1  # standard deviation the codec decoder is calibrated to
SHAPES = ("tiny", "0.6B", "1.7B")
_MODEL_SIZE_NAMES = {"0.6B": "0b6", "1.7B": "1b7"}  # config.json's tts_model_size
PUBLISHED_CODEBOOK_SIZE = 2048
PUBLISHED_CODE_GROUPS = 16

# Sizes of the published Qwen3-TTS-12Hz Base checkpoints (config.json's talker_config).
_PUBLISHED_PREDICTOR = {
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 5,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": PUBLISHED_CODEBOOK_SIZE,
    "num_code_groups": PUBLISHED_CODE_GROUPS,
    "rope_theta": 1_000_000,
}
_PUBLISHED_TALKER = {
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": PUBLISHED_CODEBOOK_SIZE + 1024,
    "num_code_groups": PUBLISHED_CODE_GROUPS,
    "text_hidden_size": 2048,
    "text_vocab_size": 151_936,
    "rope_theta": 1_000_000,
    "rope_scaling": {"rope_type": "default", "mrope_section": [24, 20, 20], "interleaved": True},
    "codec_eos_token_id": PUBLISHED_CODEBOOK_SIZE + 102,
    "code_predictor_config": _PUBLISHED_PREDICTOR,
}
# The published Qwen3-TTS-Tokenizer-12Hz (speech_tokenizer/config.json), shared by both sizes.
_PUBLISHED_CODEC_ENCODER = {
    "codebook_size": PUBLISHED_CODEBOOK_SIZE,
    "codebook_dim": 256,
    "num_quantizers": 32,
    "hidden_size": 512,
    "frame_rate": 12.5,
}
_PUBLISHED_CODEC_DECODER = {
    "codebook_size": PUBLISHED_CODEBOOK_SIZE,
    "codebook_dim": 512,
    "hidden_size": 512,
    "head_dim": 64,
    "latent_dim": 1024,
    "intermediate_size": 1024,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "num_hidden_layers": 8,
    "num_quantizers": PUBLISHED_CODE_GROUPS,
    "sliding_window": 72,
    "upsample_rates": [8, 5, 4, 3],
    "upsampling_ratios": [2, 2],
    "decoder_dim": 1536,
}
PUBLISHED_TALKERS: dict[str, dict[str, Any]] = {
    "1.7B": _PUBLISHED_TALKER | {"hidden_size": 2048, "intermediate_size": 6144},
    "0.6B": _PUBLISHED_TALKER | {"hidden_size": 1024, "intermediate_size": 3072},
}
_LANGUAGES = [name.lower() for name in SUPPORTED_LANGUAGES if name != DEFAULT_LANGUAGE]


def _control_ids(codebook_size: int) -> dict[str, int]:
    """The talker's codec vocabulary is C real codes plus 1024 control tokens; qwen-tts
    suppresses the top 1024 ids during sampling except the end token, so every control id
    lives up there (at the published models' offsets)."""
    offsets = {
        "codec_pad_id": 100,
        "codec_bos_id": 101,
        "codec_eos_token_id": 102,
        "codec_think_id": 106,
        "codec_nothink_id": 107,
        "codec_think_bos_id": 108,
        "codec_think_eos_id": 109,
    }
    return {name: codebook_size + offset for name, offset in offsets.items()}


_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<tts_pad>",
    "<tts_text_bos>",
    "<tts_text_eod>",
)
# Qwen2's pre-tokenizer split, so "assistant" and "\n" stay separate tokens: the model slices
# prompts by position and needs "<|im_start|>assistant\n" to be exactly 3 tokens.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TOKENIZER_CORPUS = (
    "<|im_start|>assistant\nHello world. This tiny voice cloning model speaks noise.<|im_end|>\n",
    "The quick brown fox jumps over the lazy dog, again and again!",
)
_GENERATION_CONFIG = {
    "do_sample": True,
    "top_k": 50,
    "top_p": 1.0,
    "temperature": 0.9,
    "repetition_penalty": 1.05,
    "subtalker_dosample": True,
    "subtalker_top_k": 50,
    "subtalker_top_p": 1.0,
    "subtalker_temperature": 0.9,
    "max_new_tokens": 32,  # short by default: the model never learned when to stop
}


def build_tiny_model(directory: str | Path, *, seed: int = 0, fixed_length: bool = False) -> Path:
    """Write a loadable tiny model folder (`build_random_model`'s `tiny` shape)."""
    return build_random_model(directory, "tiny", seed=seed, fixed_length=fixed_length)


def build_random_model(
    directory: str | Path,
    shape: str = "tiny",
    *,
    seed: int = 0,
    fixed_length: bool = False,
    device: str = "cpu",
) -> Path:
    """Write a loadable model folder (weights, configs, text and speech tokenizers) of `shape`,
    its weights made on `device` (a full-size shape builds in seconds on a GPU, minutes on a
    CPU) and saved in float32.

    With `fixed_length` the end token can never be sampled, so every generation lasts exactly
    `max_new_tokens - 1` frames; otherwise random weights stop at a random frame.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = _text_tokenizer()
    Qwen3TTSProcessor(tokenizer=tokenizer).save_pretrained(directory)
    with torch.device(device):
        model = Qwen3TTSForConditionalGeneration(model_config(shape, tokenizer, fixed_length))
    model.save_pretrained(directory)
    del model
    _repair_speaker_encoder_config(directory / "config.json")
    speech_dir = directory / "speech_tokenizer"
    with torch.device(device):
        codec = _speech_tokenizer(speech_tokenizer_config(shape))
    codec.save_pretrained(speech_dir)
    EncodecFeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE).save_pretrained(speech_dir)
    (directory / "generation_config.json").write_text(json.dumps(_GENERATION_CONFIG, indent=2))
    return directory


def _text_tokenizer() -> Qwen2TokenizerFast:
    """A byte-level BPE trained on a few lines, wrapped as the Qwen2 tokenizer qwen-tts expects."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=list(_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(_TOKENIZER_CORPUS) * 20, trainer)
    return Qwen2TokenizerFast(
        tokenizer_object=tokenizer,
        unk_token=None,  # pyright: ignore[reportArgumentType]  # transformers takes None: no unknown token
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )


def model_config(
    shape: str, tokenizer: Qwen2TokenizerFast | None = None, fixed_length: bool = False
) -> Qwen3TTSConfig:
    """The model's config: `tiny`, or the published sizes of `0.6B` / `1.7B` (the speaker
    encoder's width is the talker's; its other sizes are qwen-tts's defaults, as published).
    The text special tokens' ids are the byte-level tokenizer's (default: a new one)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    tokenizer = tokenizer or _text_tokenizer()
    token_id = _token_ids(tokenizer)
    if shape == "tiny":
        talker, codebook_size = _tiny_talker(len(tokenizer)), CODEBOOK_SIZE
        speaker_encoder = _TINY_SPEAKER_ENCODER
    else:
        talker, codebook_size = dict(PUBLISHED_TALKERS[shape]), PUBLISHED_CODEBOOK_SIZE
        speaker_encoder = {"enc_dim": talker["hidden_size"], "sample_rate": SAMPLE_RATE}
    control_ids = _control_ids(codebook_size)
    talker |= control_ids | {
        "spk_id": {},
        "spk_is_dialect": {},
        "codec_language_id": {name: codebook_size + 200 + i for i, name in enumerate(_LANGUAGES)},
    }
    if fixed_length:
        # Read by the talker's GenerationConfig; qwen-tts does not override sequence_bias.
        talker["sequence_bias"] = [[[control_ids["codec_eos_token_id"]], -1e9]]
    return Qwen3TTSConfig(
        talker_config=talker,
        speaker_encoder_config=speaker_encoder,
        tokenizer_type="qwen3_tts_tokenizer_12hz",
        tts_model_size=_MODEL_SIZE_NAMES.get(shape, shape),
        tts_model_type="base",
        im_start_token_id=token_id("<|im_start|>"),
        im_end_token_id=token_id("<|im_end|>"),
        tts_pad_token_id=token_id("<tts_pad>"),
        tts_bos_token_id=token_id("<tts_text_bos>"),
        tts_eos_token_id=token_id("<tts_text_eod>"),
    )


def _token_ids(tokenizer: Qwen2TokenizerFast) -> Callable[[str], int]:
    """Id of one special token (transformers' stub also allows a list, for a list of tokens)."""

    def token_id(token: str) -> int:
        found = tokenizer.convert_tokens_to_ids(token)
        if not isinstance(found, int):
            raise TypeError(f"{token!r} is not one token")
        return found

    return token_id


def _tiny_talker(text_vocab_size: int) -> dict[str, Any]:
    layer = {"hidden_size": HIDDEN, "intermediate_size": 64, "num_attention_heads": 2}
    layer |= {"num_key_value_heads": 1, "head_dim": 16}
    return {
        **layer,
        "num_hidden_layers": 2,
        "vocab_size": CODEBOOK_SIZE + 1024,
        "num_code_groups": CODE_GROUPS,
        "text_hidden_size": HIDDEN,
        "text_vocab_size": text_vocab_size,
        "max_position_embeddings": 8192,
        # Multimodal RoPE as in the real talker; sections add up to head_dim / 2.
        "rope_scaling": {"rope_type": "default", "mrope_section": [4, 2, 2], "interleaved": True},
        "code_predictor_config": {
            **layer,
            "num_hidden_layers": 1,
            "vocab_size": CODEBOOK_SIZE,
            "num_code_groups": CODE_GROUPS,
        },
    }


_TINY_SPEAKER_ENCODER = {
    "mel_dim": 128,
    "enc_dim": HIDDEN,
    "enc_channels": [32, 32, 32, 32, 96],
    "enc_kernel_sizes": [5, 3, 3, 3, 1],
    "enc_dilations": [1, 2, 3, 4, 1],
    "enc_attention_channels": 16,
    "enc_res2net_scale": 4,
    "enc_se_channels": 16,
    "sample_rate": SAMPLE_RATE,
}


def _repair_speaker_encoder_config(config_path: Path) -> None:
    """qwen-tts 0.1.1 saves `speaker_encoder_config.model_type: ""`, which its own config class
    rejects on load (it takes no extra keys)."""
    config = json.loads(config_path.read_text())
    config["speaker_encoder_config"].pop("model_type", None)
    config_path.write_text(json.dumps(config, indent=2))


def speech_tokenizer_config(shape: str) -> Qwen3TTSTokenizerV2Config:
    """The 12 Hz codec's config: a Mimi encoder for reference audio and the Qwen decoder for
    output; for the full-size shapes qwen-tts's defaults (the published tokenizer's sizes)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    if shape != "tiny":
        return Qwen3TTSTokenizerV2Config(
            encoder_config=_PUBLISHED_CODEC_ENCODER,
            decoder_config=_PUBLISHED_CODEC_DECODER,
            encoder_valid_num_quantizers=PUBLISHED_CODE_GROUPS,
        )
    encoder = {
        "sampling_rate": SAMPLE_RATE,
        "frame_rate": 12.5,
        "hidden_size": HIDDEN,
        "num_filters": 4,
        "codebook_size": CODEBOOK_SIZE,
        "codebook_dim": 16,
        "num_quantizers": CODE_GROUPS,
        "vector_quantization_hidden_dimension": 16,
        "upsample_groups": HIDDEN,
        "num_hidden_layers": 1,
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "head_dim": 16,
    }
    decoder = {
        "codebook_size": CODEBOOK_SIZE,
        "codebook_dim": 16,
        "hidden_size": HIDDEN,
        "latent_dim": HIDDEN,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_quantizers": CODE_GROUPS,
        "decoder_dim": 32,  # halved once per upsampling stage (8, 5, 4, 3); must stay >= 1
    }
    return Qwen3TTSTokenizerV2Config(
        encoder_config=encoder, decoder_config=decoder, encoder_valid_num_quantizers=CODE_GROUPS
    )


def _speech_tokenizer(config: Qwen3TTSTokenizerV2Config) -> Qwen3TTSTokenizerV2Model:
    codec = Qwen3TTSTokenizerV2Model(config)
    _randomise(codec)
    _calibrate_output(codec)
    return codec


def _randomise(codec: torch.nn.Module) -> None:
    """The default init leaves codebooks at zero and layers near zero, so everything decodes to
    near silence and all audio encodes to the same codes: draw layers and codebooks afresh."""
    for module in codec.modules():
        if module is not codec and isinstance(module, _RESETTABLE):
            module.reset_parameters()
    with torch.no_grad():
        for name, tensor in [*codec.named_parameters(), *codec.named_buffers()]:
            if name.endswith(("embedding_sum", "embed_sum")):
                tensor.normal_()


_RESETTABLE = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.ConvTranspose1d, torch.nn.LayerNorm)


@torch.no_grad()
def _calibrate_output(codec: Qwen3TTSTokenizerV2Model) -> None:
    """Rescale the last convolution so decoded audio is centred with a speech-like level."""
    final_conv = cast(torch.nn.Conv1d, codec.decoder.decoder[-1].conv)
    captured: list[torch.Tensor] = []
    hook = final_conv.register_forward_hook(
        lambda _module, _inputs, output: captured.append(cast(torch.Tensor, output))
    )
    decoder = codec.config.decoder_config
    codes = torch.randint(0, decoder.codebook_size, (1, decoder.num_quantizers, 50))
    codec.decoder(codes.to(final_conv.weight.device))
    hook.remove()
    mean, std = captured[0].mean(), captured[0].std()
    scale = OUTPUT_LEVEL / std
    final_conv.weight.mul_(scale)
    if final_conv.bias is not None:  # the decoder's convolutions all have one
        final_conv.bias.sub_(mean).mul_(scale)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("directory", type=Path, help="folder to write the model into")
    parser.add_argument("--shape", choices=SHAPES, default="tiny")
    parser.add_argument("--device", default="cpu", help="where to make the weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--fixed-length",
        action="store_true",
        help="never stop early: every generation lasts max_new_tokens - 1 frames",
    )
    args = parser.parse_args(argv)
    path = build_random_model(
        args.directory,
        args.shape,
        seed=args.seed,
        fixed_length=args.fixed_length,
        device=args.device,
    )
    print(f"Random {args.shape} Qwen3-TTS written to {path}")


if __name__ == "__main__":
    main()
