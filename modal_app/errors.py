"""The engine's errors: one small hierarchy, importable without torch or Modal.

Callers decide retry policy from the type alone: `InvalidInput` will fail the same way again,
`GenerationFailed` may not.
"""


class EngineError(Exception):
    """Base of everything the engine raises on purpose."""


class InvalidInput(EngineError):
    """The request cannot be served as given (bad language, text, reference audio or option)."""


class GenerationFailed(EngineError):
    """The model failed while generating; the request itself was valid."""
