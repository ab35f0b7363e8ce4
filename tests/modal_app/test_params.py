from typing import Any

import pytest

from modal_app.errors import InvalidInput
from modal_app.params import GenerationParams


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
