"""Generation options, validated; no torch, so the worker can build and check them too."""

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from modal_app.errors import InvalidInput


@dataclass(frozen=True)
class GenerationParams:
    """Sampling options; None leaves the model's own default (its generation_config.json)."""

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int | None = None  # per chunk, in 12.5 Hz codec frames
    seed: int | None = None

    def __post_init__(self) -> None:
        for name, (kind, is_valid, rule) in PARAM_RULES.items():
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, kind):
                noun = "an integer" if kind is int else "a number"
                raise InvalidInput(f"'{name}' must be {noun}, got {value!r}")
            if not is_valid(value):
                raise InvalidInput(f"'{name}' {rule}, got {value!r}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> "GenerationParams":
        """Build from a plain dict (as sent over Modal); unknown keys are an input error."""
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


_REAL = (int, float)
# Each parameter's rule: its type, the check, and the words that state it, in error messages
# and in the request schema's docs (schemas/avro/clone_request.avsc; a test compares them).
PARAM_RULES = {
    "temperature": (_REAL, lambda value: value > 0, "must be greater than 0"),
    "top_k": (int, lambda value: value >= 0, "must be 0 or more"),
    "top_p": (_REAL, lambda value: 0 < value <= 1, "must be in (0, 1]"),
    "repetition_penalty": (_REAL, lambda value: value > 0, "must be greater than 0"),
    "max_new_tokens": (int, lambda value: 1 <= value <= 16_384, "must be between 1 and 16384"),
    "seed": (int, lambda value: 0 <= value < 2**63, "must be between 0 and 2**63 - 1"),
}
