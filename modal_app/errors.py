"""The engine's own error, beside the contract's (`schemas.vocabulary`): `InvalidInput` will fail
the same way again, `GenerationFailed` may not, `RequestStopped` is what the caller asked for."""

from schemas.vocabulary import VoicecloneError


class RequestStopped(VoicecloneError):
    """The caller cancelled the request or its deadline passed before the audio was done."""
