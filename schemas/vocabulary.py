"""The product's vocabulary: the words both sides of the contract speak, defined once.

Model names and sizes, languages, audio formats, error codes, the generation parameters with
their rules, and the one error base every failure of a request derives from. The event models
(`schemas.events`), the worker (`consumer`, `producer`) and the GPU service (`modal_app`) all
import them from here.

Standard library only: the GPU service ships this package into its image and must not need
pydantic or fastavro for it. Enum values are the Avro symbols of the .avsc files.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Final


class ModelSize(StrEnum):
    """The size key backends deploy by (a Modal app, a base URL, a weights folder per size)."""

    LARGE = "1.7B"
    SMALL = "0.6B"


class ModelName(StrEnum):
    QWEN3_TTS_12HZ_1_7B_BASE = "QWEN3_TTS_12HZ_1_7B_BASE"
    QWEN3_TTS_12HZ_0_6B_BASE = "QWEN3_TTS_12HZ_0_6B_BASE"

    @property
    def hub_id(self) -> str:
        """The Hugging Face Hub repository of the weights."""
        return f"Qwen/Qwen3-TTS-12Hz-{self.size}-Base"

    @property
    def size(self) -> ModelSize:
        return _MODEL_SIZES[self]

    @classmethod
    def of_size(cls, size: str) -> "ModelName":
        """The model of a size key such as `1.7B`."""
        return _MODELS_BY_SIZE[ModelSize(size)]

    @classmethod
    def _missing_(cls, value: object) -> "ModelName | None":
        # Lets settings and CLIs name a model by its hub id as well as by its symbol.
        if not isinstance(value, str):
            return None
        return next((model for model in cls if model.hub_id == value), None)


_MODEL_SIZES: Final[Mapping[ModelName, ModelSize]] = MappingProxyType(
    {
        ModelName.QWEN3_TTS_12HZ_1_7B_BASE: ModelSize.LARGE,
        ModelName.QWEN3_TTS_12HZ_0_6B_BASE: ModelSize.SMALL,
    }
)
_MODELS_BY_SIZE: Final[Mapping[ModelSize, ModelName]] = MappingProxyType(
    {size: model for model, size in _MODEL_SIZES.items()}
)
DEFAULT_MODEL: Final = ModelName.QWEN3_TTS_12HZ_1_7B_BASE


class Language(StrEnum):
    AUTO = "AUTO"
    CHINESE = "CHINESE"
    ENGLISH = "ENGLISH"
    JAPANESE = "JAPANESE"
    KOREAN = "KOREAN"
    GERMAN = "GERMAN"
    FRENCH = "FRENCH"
    RUSSIAN = "RUSSIAN"
    PORTUGUESE = "PORTUGUESE"
    SPANISH = "SPANISH"
    ITALIAN = "ITALIAN"

    @property
    def engine_name(self) -> str:
        """The name the engine and the seed's HTTP contract use: "Auto", "English", ..."""
        return self.value.capitalize()


class AudioFormat(StrEnum):
    """Output formats, all written by libsndfile."""

    WAV = "WAV"
    FLAC = "FLAC"
    OGG_OPUS = "OGG_OPUS"
    MP3 = "MP3"

    @classmethod
    def parse(cls, value: "str | AudioFormat") -> "AudioFormat":
        """Accept the value or the name in any case, plus the common aliases `ogg` and `opus`."""
        found = _FORMAT_ALIASES.get(str(value).strip().lower())
        if found is None:
            names = ", ".join(member.value for member in cls)
            raise InvalidInput(f"Unsupported output format: {value}. Supported: {names}")
        return found

    @property
    def content_type(self) -> str:
        return _CONTENT_TYPES[self]

    @property
    def extension(self) -> str:
        return _EXTENSIONS[self]


_FORMAT_ALIASES: Final = MappingProxyType(
    {member.value.lower(): member for member in AudioFormat}
    | {"ogg": AudioFormat.OGG_OPUS, "opus": AudioFormat.OGG_OPUS}
)
_CONTENT_TYPES: Final = MappingProxyType(
    {
        AudioFormat.WAV: "audio/wav",
        AudioFormat.FLAC: "audio/flac",
        AudioFormat.OGG_OPUS: "audio/ogg",
        AudioFormat.MP3: "audio/mpeg",
    }
)
_EXTENSIONS: Final = MappingProxyType(
    {
        AudioFormat.WAV: "wav",
        AudioFormat.FLAC: "flac",
        AudioFormat.OGG_OPUS: "ogg",
        AudioFormat.MP3: "mp3",
    }
)


class ErrorCode(StrEnum):
    INVALID_REQUEST = "INVALID_REQUEST"
    UNSUPPORTED_LANGUAGE = "UNSUPPORTED_LANGUAGE"
    REFERENCE_AUDIO_UNAVAILABLE = "REFERENCE_AUDIO_UNAVAILABLE"
    REFERENCE_AUDIO_INVALID = "REFERENCE_AUDIO_INVALID"
    TEXT_TOO_LONG = "TEXT_TOO_LONG"
    INFERENCE_FAILED = "INFERENCE_FAILED"
    INFERENCE_TIMEOUT = "INFERENCE_TIMEOUT"
    STORAGE_FAILED = "STORAGE_FAILED"
    EXPIRED = "EXPIRED"
    CANCELLED = "CANCELLED"


# -- errors -------------------------------------------------------------------------------------


class VoicecloneError(Exception):
    """Base of every error the product raises on purpose about a request or its parts.

    `code` is the clone-failed event's error code; `transient` says whether trying again later
    may succeed (the worker retries a transient failure, and a clone-failed event reports it as
    `retryable`). Subclasses set both as class attributes; an instance may override either.
    `message` is for people, as `str(error)`.
    """

    code: ErrorCode = ErrorCode.INFERENCE_FAILED  # the generic server-side failure
    transient: bool = False

    def __init__(
        self, message: str, *, code: ErrorCode | None = None, transient: bool | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if transient is not None:
            self.transient = transient

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.message!r}, code={self.code}, transient={self.transient})"
        )


class InvalidInput(VoicecloneError):
    """The request cannot be served as given (language, text, reference audio, option); it
    will fail the same way again. `code` may be UNSUPPORTED_LANGUAGE or TEXT_TOO_LONG."""

    code = ErrorCode.INVALID_REQUEST


class GenerationFailed(VoicecloneError):
    """The model (or the service running it) failed to produce audio for a valid request."""


# -- generation parameters ----------------------------------------------------------------------


@dataclass(frozen=True)
class ParamRule:
    """What one generation parameter accepts; `words` state it, in error messages and in the
    request schema's docs (schemas/avro/clone_request.avsc; a test compares them)."""

    kind: type | tuple[type, ...]
    accepts: Callable[[Any], bool]
    words: str

    def check(self, name: str, value: object) -> None:
        """Raise InvalidInput unless `value` (not None) follows the rule."""
        if isinstance(value, bool) or not isinstance(value, self.kind):
            noun = "an integer" if self.kind is int else "a number"
            raise InvalidInput(f"'{name}' must be {noun}, got {value!r}")
        if not self.accepts(value):
            raise InvalidInput(f"'{name}' {self.words}, got {value!r}")


_REAL = (int, float)
PARAM_RULES: Final[Mapping[str, ParamRule]] = MappingProxyType(
    {
        "temperature": ParamRule(_REAL, lambda value: value > 0, "must be greater than 0"),
        "top_k": ParamRule(int, lambda value: value >= 0, "must be 0 or more"),
        "top_p": ParamRule(_REAL, lambda value: 0 < value <= 1, "must be in (0, 1]"),
        "repetition_penalty": ParamRule(_REAL, lambda value: value > 0, "must be greater than 0"),
        "max_new_tokens": ParamRule(
            int, lambda value: 1 <= value <= 16_384, "must be between 1 and 16384"
        ),
        "seed": ParamRule(int, lambda value: 0 <= value < 2**63, "must be between 0 and 2**63 - 1"),
    }
)


@dataclass(frozen=True)
class GenerationParams:
    """Sampling options, checked against PARAM_RULES (InvalidInput); None leaves the model's
    own default (its generation_config.json)."""

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int | None = None  # per chunk, in 12.5 Hz codec frames
    seed: int | None = None

    def __post_init__(self) -> None:
        for name, rule in PARAM_RULES.items():
            value = getattr(self, name)
            if value is not None:
                rule.check(name, value)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> "GenerationParams":
        """Build from a plain dict (as sent over Modal, or an event's record); unknown keys are
        an input error."""
        values = dict(values or {})
        unknown = sorted(set(values) - {item.name for item in fields(cls)})
        if unknown:
            raise InvalidInput(f"Unknown generation parameters: {', '.join(unknown)}")
        return cls(**values)

    def overrides(self) -> dict[str, float | int]:
        """The options that were set, by name (what a remote call carries)."""
        return {
            item.name: getattr(self, item.name)
            for item in fields(self)
            if getattr(self, item.name) is not None
        }

    def sampling_kwargs(self) -> dict[str, float | int]:
        """The options to forward to `generate_voice_clone`: all that were set but the seed."""
        return {name: value for name, value in self.overrides().items() if name != "seed"}
