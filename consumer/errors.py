"""The one error a pipeline stage raises: it becomes a clone-failed event."""

from typing import TYPE_CHECKING

from schemas.events import ErrorCode

if TYPE_CHECKING:
    from consumer.metrics import Stage


class CloneError(Exception):
    """A request cannot be served; `code`, `retryable` and `attempts` (how many times the
    failing stage was tried) go into the clone-failed event. `stage_ms`: the milliseconds
    each timed stage that ran took, the failing one last (for the outcome's log line)."""

    def __init__(
        self, code: ErrorCode, message: str, *, retryable: bool = False, attempts: int = 1
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable
        self.attempts = attempts
        self.stage_ms: dict[Stage, int] = {}
