"""Typed errors raised at the storage boundary.

Callers decide between retrying and dead-lettering from ``StorageError.transient`` alone, so
backend exceptions (botocore, aiohttp, OSError) never leak past this package.
"""

from schemas.vocabulary import ErrorCode, VoicecloneError


class StorageError(VoicecloneError):
    """A storage operation failed; ``transient`` says whether retrying later may succeed."""

    code = ErrorCode.STORAGE_FAILED

    def __init__(self, message: str, *, transient: bool, key: str | None = None) -> None:
        super().__init__(message, transient=transient)
        self.key = key


class ObjectNotFound(StorageError):
    """The object (or the file behind a ``file://`` URI) does not exist."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message, transient=False, key=key)


class ObjectTooLarge(StorageError):
    """The object is larger than the caller's ``max_bytes`` cap; nothing past the cap was read."""

    def __init__(self, message: str, *, max_bytes: int, key: str | None = None) -> None:
        super().__init__(message, transient=False, key=key)
        self.max_bytes = max_bytes


class UriNotAllowed(StorageError):
    """A URI this storage refuses to read: wrong scheme, outside the root, or a foreign bucket."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message, transient=False, key=key)


class InvalidKeyError(VoicecloneError, ValueError):
    """An id, prefix or key that is empty, too long, or could escape the storage root; a
    request naming such an id is invalid."""

    code = ErrorCode.INVALID_REQUEST


class InvalidMetadataError(ValueError):
    """Object metadata that S3 would reject or silently alter (case, non-ASCII, size)."""
