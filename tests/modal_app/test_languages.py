import pytest

from modal_app.languages import SUPPORTED_LANGUAGES, normalize_language
from schemas.vocabulary import ErrorCode, InvalidInput


def test_the_seeds_eleven_names() -> None:
    assert SUPPORTED_LANGUAGES == (
        "Auto",
        "Chinese",
        "English",
        "Japanese",
        "Korean",
        "German",
        "French",
        "Russian",
        "Portuguese",
        "Spanish",
        "Italian",
    )


@pytest.mark.parametrize(("given", "expected"), [("english", "English"), (" GERMAN ", "German")])
def test_names_match_case_insensitively(given: str, expected: str) -> None:
    assert normalize_language(given) == expected


@pytest.mark.parametrize("given", [None, "", "  "])
def test_missing_language_means_auto(given: str | None) -> None:
    assert normalize_language(given) == "Auto"


def test_unsupported_language_lists_the_supported_ones() -> None:
    with pytest.raises(InvalidInput) as caught:
        normalize_language("Klingon")

    assert str(caught.value) == (
        "Unsupported language: Klingon. Supported: Auto, Chinese, English, Japanese, Korean, "
        "German, French, Russian, Portuguese, Spanish, Italian"
    )
    assert caught.value.code == ErrorCode.UNSUPPORTED_LANGUAGE


def test_a_model_may_support_fewer_languages() -> None:
    with pytest.raises(InvalidInput, match=r"Supported: Auto, English$"):
        normalize_language("German", supported=("Auto", "English"))
