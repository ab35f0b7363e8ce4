"""Language names the service accepts: the seed's capitalised words (the vocabulary's
`Language.engine_name`), matched case-insensitively."""

from collections.abc import Sequence

from schemas.vocabulary import ErrorCode, InvalidInput, Language

DEFAULT_LANGUAGE = Language.AUTO.engine_name
SUPPORTED_LANGUAGES: tuple[str, ...] = tuple(language.engine_name for language in Language)
_BY_LOWER = {name.lower(): name for name in SUPPORTED_LANGUAGES}


def normalize_language(name: str | None, supported: Sequence[str] = SUPPORTED_LANGUAGES) -> str:
    """The canonical spelling of `name` if it is in `supported`; None or blank means `Auto`."""
    if name is None or not name.strip():
        return DEFAULT_LANGUAGE
    canonical = _BY_LOWER.get(name.strip().lower())
    if canonical is None or canonical not in supported:
        raise InvalidInput(
            f"Unsupported language: {name}. Supported: {', '.join(supported)}",
            code=ErrorCode.UNSUPPORTED_LANGUAGE,
        )
    return canonical
