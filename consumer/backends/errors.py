"""Backend errors: one hierarchy that every vendor exception is translated into.

`transient` tells the worker whether trying again later may succeed; `code` is the clone-failed
event's error code (`schemas.events.ErrorCode`).
"""

from schemas.events import ErrorCode


class BackendError(Exception):
    """A clone call failed; see `transient` and `code`."""

    transient: bool = False
    code: ErrorCode = ErrorCode.INFERENCE_FAILED

    def __init__(self, message: str, *, transient: bool | None = None) -> None:
        super().__init__(message)
        if transient is not None:
            self.transient = transient

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r}, code={self.code}, transient={self.transient})"


class BackendTimeout(BackendError):
    """No result before the deadline (ours or the backend's own execution limit)."""

    transient = True
    code = ErrorCode.INFERENCE_TIMEOUT


class BackendUnavailable(BackendError):
    """The backend could not be reached or refused service.

    Transient for outages and overload; permanent (pass `transient=False`) when the backend is
    misconfigured: bad credentials, app not deployed, wrong URL.
    """

    transient = True


class GenerationFailed(BackendError):
    """The backend was reached but failed to produce audio."""


class InvalidInput(BackendError):
    """The backend rejected the request itself; never worth retrying."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.INVALID_REQUEST) -> None:
        super().__init__(message, transient=False)
        self.code = code


def invalid_input_from_message(message: str) -> InvalidInput:
    """An `InvalidInput` whose code is read from a backend's rejection message.

    Both the seed HTTP service and the Modal service word rejections the same way, e.g.
    "Unsupported language: X. Supported: ..." or "Text too long: ...".
    """
    lowered = message.lower()
    if lowered.startswith("unsupported language"):
        return InvalidInput(message, ErrorCode.UNSUPPORTED_LANGUAGE)
    if "too long" in lowered:
        return InvalidInput(message, ErrorCode.TEXT_TOO_LONG)
    return InvalidInput(message)
