"""A request's deadline, read once: how long is left, and the one EXPIRED error."""

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Self

from schemas.vocabulary import ErrorCode, VoicecloneError


class Expired(VoicecloneError):
    """The request's deadline passed before its audio was ready."""

    code = ErrorCode.EXPIRED

    def __init__(self) -> None:
        super().__init__("the request's deadline passed")


@dataclass(frozen=True)
class Deadline:
    """When a request stops being useful, as a `time.monotonic()` value (None: never).

    Read from the request's UTC deadline once, so every stage measures the same time left on a
    clock that wall-clock adjustments do not move.
    """

    at: float | None

    @classmethod
    def of(cls, deadline: datetime | None) -> Self:
        """The deadline a request's `deadline` field states."""
        if deadline is None:
            return cls(None)
        return cls(time.monotonic() + (deadline - datetime.now(UTC)).total_seconds())

    def remaining(self) -> float | None:
        """Seconds left (zero or less once passed); None without a deadline."""
        return None if self.at is None else self.at - time.monotonic()

    @property
    def expired(self) -> bool:
        left = self.remaining()
        return left is not None and left <= 0

    def check(self) -> None:
        """Raise `Expired` if the deadline has passed."""
        if self.expired:
            raise Expired()
