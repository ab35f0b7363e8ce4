"""The vocabulary both sides of the contract speak: standard library only, one definition of
each word, errors that keep their code and retry flag wherever they travel."""

import dataclasses
import pickle
from typing import Any

import pytest

from schemas import events
from schemas.errors import EventDecodeError, EventEncodeError
from schemas.vocabulary import (
    DEFAULT_MODEL,
    PARAM_RULES,
    AudioFormat,
    ErrorCode,
    GenerationFailed,
    GenerationParams,
    InvalidInput,
    Language,
    ModelName,
    ModelSize,
    VoicecloneError,
)
from tests.fixtures.process import fresh_python


def test_the_vocabulary_needs_only_the_standard_library() -> None:
    """The GPU service ships it into an image that need not have pydantic or fastavro."""
    probe = (
        "import sys; before = set(sys.modules); import schemas.vocabulary; "
        "print(sorted({name.split('.')[0] for name in set(sys.modules) - before} "
        "- set(sys.stdlib_module_names) - {'schemas'}))"
    )

    assert fresh_python(probe, timeout=60) == "[]"


def test_the_wire_record_carries_exactly_the_engines_parameters() -> None:
    names = {item.name for item in dataclasses.fields(GenerationParams)}

    assert set(events.GenerationRecord.model_fields) == names == set(PARAM_RULES)
    record = events.GenerationRecord(top_p=0.9, seed=7)
    assert record.params() == GenerationParams(top_p=0.9, seed=7)
    with pytest.raises(InvalidInput, match=r"^'top_p' must be in \(0, 1\], got 1\.5$"):
        events.GenerationRecord(top_p=1.5).params()


def test_the_events_speak_the_vocabulary() -> None:
    fields = events.CloneRequest.model_fields
    assert fields["language"].annotation is Language
    assert fields["model"].annotation is ModelName
    assert fields["output_format"].annotation is AudioFormat
    assert events.CloneFailed.model_fields["error_code"].annotation is ErrorCode
    assert DEFAULT_MODEL.size is ModelSize.LARGE


@pytest.mark.parametrize("model", list(ModelName))
def test_a_model_is_found_by_its_size_and_its_hub_id(model: ModelName) -> None:
    assert ModelName.of_size(str(model.size)) is model
    assert ModelName(model.hub_id) is model
    assert model.hub_id == f"Qwen/Qwen3-TTS-12Hz-{model.size}-Base"


def test_engine_language_names_are_the_symbols_capitalised() -> None:
    assert [language.engine_name for language in Language][:3] == ["Auto", "Chinese", "English"]


@pytest.mark.parametrize(
    ("error", "code", "transient"),
    [
        (InvalidInput("Unsupported language: X", code=ErrorCode.UNSUPPORTED_LANGUAGE),
         ErrorCode.UNSUPPORTED_LANGUAGE, False),
        (InvalidInput("bad"), ErrorCode.INVALID_REQUEST, False),
        (GenerationFailed("lost", transient=True), ErrorCode.INFERENCE_FAILED, True),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else None,
)  # fmt: skip
def test_an_error_keeps_its_code_and_transient_flag_across_a_pickle(
    error: VoicecloneError, code: ErrorCode, transient: bool
) -> None:
    """Modal pickles what the service raises and re-raises it in the worker."""
    copy = pickle.loads(pickle.dumps(error))

    assert type(copy) is type(error)
    assert (copy.code, copy.transient, copy.message) == (code, transient, error.message)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"temperature": 0}, r"^'temperature' must be greater than 0, got 0$"),
        ({"top_p": 1.5}, r"^'top_p' must be in \(0, 1\], got 1\.5$"),
        ({"top_k": -1}, r"^'top_k' must be 0 or more"),
        ({"max_new_tokens": "10"}, r"^'max_new_tokens' must be an integer, got '10'$"),
        ({"max_new_tokens": True}, r"^'max_new_tokens' must be an integer"),
        ({"repetition_penalty": "high"}, r"^'repetition_penalty' must be a number"),
        ({"seed": -1}, r"^'seed' must be between 0"),
        ({"beam_width": 4}, r"^Unknown generation parameters: beam_width$"),
    ],
)
def test_bad_generation_params_are_invalid_input(params: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        GenerationParams.from_mapping(params)


def test_only_the_set_sampling_params_reach_the_model() -> None:
    params = GenerationParams.from_mapping({"temperature": 0.7, "max_new_tokens": 9, "seed": 3})

    assert params.sampling_kwargs() == {"temperature": 0.7, "max_new_tokens": 9}


def test_overrides_are_the_set_options_for_a_remote_call() -> None:
    params = GenerationParams(top_k=20, seed=0)

    assert params.overrides() == {"top_k": 20, "seed": 0}
    assert GenerationParams.from_mapping(params.overrides()) == params
    assert GenerationParams.from_mapping(None) == GenerationParams()


def test_codec_errors_are_transient_only_for_an_outage() -> None:
    invalid = EventDecodeError("invalid_record", "generation.top_p: bad")
    outage = EventEncodeError("registry_unavailable", "down")

    assert (invalid.code, invalid.transient) == (ErrorCode.INVALID_REQUEST, False)
    assert isinstance(outage, VoicecloneError)
    assert outage.transient
