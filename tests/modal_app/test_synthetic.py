"""The tiny model keeps the facts the real qwen-tts code relies on."""

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("qwen_tts", reason="needs the engine extra")

from transformers import AutoTokenizer

from modal_app.engine import BatchCloneInput, Engine
from modal_app.synthetic import (
    CODEBOOK_SIZE,
    HIDDEN,
    SAMPLES_PER_FRAME,
    main,
    model_config,
    speech_tokenizer_config,
)
from schemas.vocabulary import GenerationParams

pytestmark = pytest.mark.engine


def test_prompt_markers_tokenise_to_the_lengths_qwen_tts_slices_by(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    assert len(tokenizer("<|im_start|>assistant\n")["input_ids"]) == 3
    assert len(tokenizer("<|im_end|>\n<|im_start|>assistant\n")["input_ids"]) == 5


def test_configs_agree_on_codebooks_and_sizes(tiny_model_dir: Path) -> None:
    config = json.loads((tiny_model_dir / "config.json").read_text())
    codec = json.loads((tiny_model_dir / "speech_tokenizer" / "config.json").read_text())
    talker = config["talker_config"]

    assert talker["vocab_size"] == CODEBOOK_SIZE + 1024
    assert talker["code_predictor_config"]["vocab_size"] == CODEBOOK_SIZE
    assert codec["decoder_config"]["codebook_size"] == CODEBOOK_SIZE
    assert codec["encoder_config"]["codebook_size"] == CODEBOOK_SIZE
    assert config["speaker_encoder_config"]["enc_dim"] == talker["hidden_size"] == HIDDEN
    assert "model_type" not in config["speaker_encoder_config"]
    control_ids = [value for key, value in talker.items() if key.startswith("codec_")]
    assert all(
        CODEBOOK_SIZE <= value < CODEBOOK_SIZE + 1024
        for value in control_ids
        if isinstance(value, int)
    )
    assert (tiny_model_dir / "generation_config.json").exists()
    assert (tiny_model_dir / "speech_tokenizer" / "preprocessor_config.json").exists()


def test_command_line_builds_a_model_that_stops_on_its_own(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], reference_wav: bytes
) -> None:
    main([str(tmp_path / "tiny"), "--seed", "3"])
    engine = Engine.load(tmp_path / "tiny")

    # Without --fixed-length each text ends where the random talker samples the end token.
    result = engine.clone_batch(
        BatchCloneInput(
            texts=["One.", "Two.", "Three.", "Four."],
            reference_audio=reference_wav,
            params=GenerationParams(max_new_tokens=20),
        )
    )

    assert "Random tiny Qwen3-TTS written to" in capsys.readouterr().out
    lengths = [len(item.waveform) for item in result.items]
    assert all(length % SAMPLES_PER_FRAME == 0 for length in lengths)
    assert all(length <= 19 * SAMPLES_PER_FRAME for length in lengths)


# Parameters of the full-size shapes, counted on the meta device (no memory, no weights):
# the talker with its code predictor, text embedding and speaker encoder; the speech tokenizer.
FULL_SIZE_PARAMETERS = {
    "0.6B": (914_643_008, 153_714_657),
    "1.7B": (1_928_677_440, 153_714_657),
}


@pytest.mark.parametrize("shape", ["0.6B", "1.7B"])
def test_full_size_shapes_have_the_published_sizes(shape: str) -> None:
    import torch
    from qwen_tts.core.models import Qwen3TTSForConditionalGeneration
    from qwen_tts.core.tokenizer_12hz.modeling_qwen3_tts_tokenizer_v2 import (
        Qwen3TTSTokenizerV2Model,
    )

    with torch.device("meta"):
        model = Qwen3TTSForConditionalGeneration(model_config(shape, fixed_length=True))
        codec = Qwen3TTSTokenizerV2Model(speech_tokenizer_config(shape))

    talker = model.config.talker_config
    width = {"0.6B": 1024, "1.7B": 2048}[shape]
    assert (talker.hidden_size, talker.num_hidden_layers, talker.num_code_groups) == (width, 28, 16)
    assert talker.code_predictor_config.num_hidden_layers == 5
    assert model.config.speaker_encoder_config.enc_dim == width  # the x-vector enters the talker
    assert model.talker.model.text_embedding.num_embeddings == 151_936
    assert codec.config.decoder_config.codebook_size == talker.code_predictor_config.vocab_size
    counts = (count_parameters(model), count_parameters(codec))
    assert counts == FULL_SIZE_PARAMETERS[shape]
    assert round(counts[0] / 1e9, 1) == {"0.6B": 0.9, "1.7B": 1.9}[shape]


def count_parameters(module: Any) -> int:
    return sum(parameter.numel() for parameter in module.parameters())
