"""A request's failure, as its clone-failed event and log line report it."""

from collections.abc import Mapping
from typing import TYPE_CHECKING

from schemas.vocabulary import ErrorCode, VoicecloneError

if TYPE_CHECKING:
    from consumer.telemetry import Stage


class CloneError(Exception):
    """A request cannot be served: `error` says why (its `code`, `message` and `transient` go
    into the clone-failed event), `attempts` how many times the failing step was tried, and
    `stage_ms` the milliseconds each timed stage that ran took, the failing one last (for the
    outcome's log line)."""

    def __init__(
        self,
        error: VoicecloneError,
        *,
        attempts: int = 1,
        stage_ms: "Mapping[Stage, int] | None" = None,
    ) -> None:
        super().__init__(error.message)
        self.error = error
        self.attempts = attempts
        self.stage_ms = dict(stage_ms or {})

    @property
    def code(self) -> ErrorCode:
        return self.error.code

    @property
    def message(self) -> str:
        return self.error.message

    @property
    def transient(self) -> bool:
        return self.error.transient
