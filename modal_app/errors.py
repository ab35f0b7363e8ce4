"""The engine's errors: one small hierarchy, importable without torch or Modal.

Callers decide retry policy from the type alone: `InvalidInput` will fail the same way again,
`GenerationFailed` may not, `RequestStopped` is what the caller asked for.
"""


class EngineError(Exception):
    """Base of everything the engine raises on purpose."""


class InvalidInput(EngineError):
    """The request cannot be served as given (bad language, text, reference audio or option)."""


class GenerationFailed(EngineError):
    """The model failed while generating; the request itself was valid."""


class RequestStopped(EngineError):
    """The caller cancelled the request or its deadline passed before the audio was done."""
