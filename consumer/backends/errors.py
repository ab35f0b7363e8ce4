"""Backend errors: every vendor exception is translated into a `VoicecloneError`.

A backend raises the contract's `InvalidInput` (the request itself was refused) and
`GenerationFailed` (no audio came back), and the two failures of its own below. Each knows its
clone-failed error code (`code`) and whether trying again later may succeed (`transient`).
"""

from schemas.vocabulary import ErrorCode, GenerationFailed, InvalidInput, VoicecloneError

__all__ = [
    "BackendError",
    "BackendTimeout",
    "BackendUnavailable",
    "ErrorCode",
    "GenerationFailed",
    "InvalidInput",
    "invalid_input_from_message",
]


class BackendError(VoicecloneError):
    """The backend itself failed: no answer in time, or no service to answer."""


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


def invalid_input_from_message(message: str) -> InvalidInput:
    """An `InvalidInput` whose code is read from a backend's rejection message.

    Both the seed HTTP service and the Modal service word rejections the same way, e.g.
    "Unsupported language: X. Supported: ..." or "Text too long: ...".
    """
    lowered = message.lower()
    if lowered.startswith("unsupported language"):
        return InvalidInput(message, code=ErrorCode.UNSUPPORTED_LANGUAGE)
    if "too long" in lowered:
        return InvalidInput(message, code=ErrorCode.TEXT_TOO_LONG)
    return InvalidInput(message)
