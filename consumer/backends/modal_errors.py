"""Modal's exceptions (and the GPU service's own, as Modal re-raises them) → our errors.

Remote exceptions: Modal re-raises an exception the service raised when it can unpickle it
here, and raises `ExecutionError` carrying the remote traceback when it cannot (the class's
module is not importable in the worker). The service signals bad input with an exception class
named `InvalidInput` (optionally with a `code` attribute) or a `ValueError` whose message
starts like the seed's rejections ("Unsupported language: ...", "Text too long ..."), so both
forms are recognised by class name and message, never by module path.
"""

import builtins
import re
from collections.abc import Callable

import modal.exception as mx

from consumer.backends.errors import (
    BackendTimeout,
    BackendUnavailable,
    ErrorCode,
    GenerationFailed,
    InvalidInput,
    invalid_input_from_message,
)
from schemas.vocabulary import VoicecloneError

_INVALID_INPUT_CLASS = "InvalidInput"
_INVALID_INPUT_CODES = frozenset(
    {ErrorCode.INVALID_REQUEST, ErrorCode.UNSUPPORTED_LANGUAGE, ErrorCode.TEXT_TOO_LONG}
)
# ValueError messages the service uses for bad input (other ValueErrors are bugs).
_INVALID_INPUT_PREFIXES = ("unsupported language", "text too long", "invalid ")
# Last "…InvalidInput: message" line of a remote traceback Modal could not unpickle.
_INVALID_INPUT_LINE = re.compile(rf"^(?:[\w.]+\.)?{_INVALID_INPUT_CLASS}: (.+)$", re.MULTILINE)

Translate = Callable[[BaseException], VoicecloneError]


def _as(error: type[VoicecloneError], what: str, *, transient: bool | None = None) -> Translate:
    def translate(exc: BaseException) -> VoicecloneError:
        return error(f"{what} ({type(exc).__name__}: {exc})", transient=transient)

    return translate


def _too_large(exc: BaseException) -> VoicecloneError:
    return InvalidInput(f"the request is too large for Modal ({exc})")


def _execution_error(exc: BaseException) -> VoicecloneError:
    matches = _INVALID_INPUT_LINE.findall(str(exc))
    if matches:
        return invalid_input_from_message(matches[-1])
    return GenerationFailed(f"the Modal call failed ({type(exc).__name__}: {exc})")


# First match wins, so subclasses come before their bases.
_RULES: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], Translate], ...] = (
    (
        (mx.AuthError, mx.PermissionDeniedError),
        _as(BackendUnavailable, "Modal refused the worker's credentials", transient=False),
    ),
    (
        mx.NotFoundError,
        _as(BackendUnavailable, "the Modal app or class was not found", transient=False),
    ),
    (
        (mx.VersionError, mx.InvalidError, mx.UnimplementedError),
        _as(BackendUnavailable, "Modal refused the call as made", transient=False),
    ),
    (builtins.TimeoutError, _as(BackendTimeout, "no answer from Modal in time")),
    (
        (mx.ConnectionError, mx.ServiceError, mx.InternalError, mx.ClientClosed, OSError),
        _as(BackendUnavailable, "could not talk to Modal"),
    ),
    (
        (mx.InternalFailure, mx.ResourceExhaustedError, mx.DataLossError),
        _as(BackendUnavailable, "Modal could not run the call now"),
    ),
    (
        mx.OutputExpiredError,
        _as(GenerationFailed, "the Modal call's result was lost", transient=True),
    ),
    (mx.TimeoutError, _as(BackendTimeout, "the Modal function hit its own time limit")),
    (mx.RequestSizeError, _too_large),
    (mx.ExecutionError, _execution_error),
    (mx.InputCancellation, _as(GenerationFailed, "the Modal call was cancelled elsewhere")),
    (mx.Error, _as(GenerationFailed, "the Modal call failed")),
)


def translate_modal_error(exc: BaseException) -> VoicecloneError:
    """Our error for `exc`, raised by a Modal lookup, spawn or result fetch.

    Anything that is not Modal's own (nor an `OSError` from the transport) is taken to be the
    service's exception re-raised here.
    """
    for types, translate in _RULES:
        if isinstance(exc, types):
            return translate(exc)
    return _remote_exception(exc)


def _remote_exception(exc: BaseException) -> VoicecloneError:
    if _is_invalid_input(exc):
        code = getattr(exc, "code", None)
        if code in _INVALID_INPUT_CODES:
            return InvalidInput(str(exc), code=ErrorCode(code))
        return invalid_input_from_message(str(exc))
    return GenerationFailed(f"the voice-cloning service failed ({type(exc).__name__}: {exc})")


def _is_invalid_input(exc: BaseException) -> bool:
    if any(cls.__name__ == _INVALID_INPUT_CLASS for cls in type(exc).__mro__):
        return True
    return isinstance(exc, builtins.ValueError) and str(exc).lower().startswith(
        _INVALID_INPUT_PREFIXES
    )
