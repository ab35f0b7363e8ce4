"""The storage interface shared by the local and S3 backends, and the checks both apply."""

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Protocol, Self

from producer.storage.errors import InvalidMetadataError

# Stored alongside the object by every backend; callers may not set it themselves.
SHA256_METADATA_KEY = "sha256"
DEFAULT_CONTENT_TYPE = "application/octet-stream"
# S3 caps user metadata at 2 KiB (keys + values); enforcing it everywhere keeps the local
# backend from accepting what S3 would reject.
_MAX_METADATA_BYTES = 2048 - len(SHA256_METADATA_KEY) - 64
# S3 lower-cases metadata names and sends values as HTTP headers (ASCII, trimmed), so anything
# else would not round-trip identically through both backends.
_METADATA_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]*")


@dataclass(frozen=True)
class StoredObject:
    """Where a written object lives and how subscribers fetch it."""

    key: str
    storage_uri: str
    url: str
    size_bytes: int
    sha256: str
    url_expires_at: datetime | None


@dataclass(frozen=True)
class ObjectInfo:
    """What ``head`` reports about an existing object."""

    key: str
    storage_uri: str
    size_bytes: int
    content_type: str
    # None when the object has no (or an inconsistent) checksum record, e.g. it was written by
    # something else or a local write was interrupted; callers must then treat it as unknown.
    sha256: str | None
    metadata: Mapping[str, str] = field(default_factory=dict)


class Storage(Protocol):
    """Object storage for generated audio and reference-audio reads.

    Keys are relative to the backend's root or bucket prefix. Use as ``async with storage:``
    or pair ``start()`` with ``close()``.
    """

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def put(
        self, key: str, data: bytes, content_type: str, metadata: Mapping[str, str]
    ) -> StoredObject:
        """Write (or overwrite) ``key`` and return where it lives and its download URL."""
        ...

    async def head(self, key: str) -> ObjectInfo | None:
        """Describe ``key``, or None if it does not exist."""
        ...

    async def read(self, uri: str, max_bytes: int) -> bytes:
        """Read the object at a storage URI this backend accepts, at most ``max_bytes`` long."""
        ...

    async def url_for(self, key: str) -> tuple[str, datetime | None]:
        """A download URL for ``key`` and when it stops working (None: does not expire)."""
        ...


class Lifecycle:
    """``async with`` support for backends in terms of their ``start()``/``close()``."""

    async def start(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def validate_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """Return ``metadata`` as a dict if it round-trips unchanged through S3, else raise."""
    total = 0
    for name, value in metadata.items():
        if _METADATA_NAME.fullmatch(name) is None or name == SHA256_METADATA_KEY:
            raise InvalidMetadataError(
                f"metadata name {name!r} must be 1-64 of [a-z0-9-] and not {SHA256_METADATA_KEY!r}"
            )
        if _PRINTABLE_ASCII.fullmatch(value) is None or value != value.strip():
            raise InvalidMetadataError(
                f"metadata {name!r} must be printable ASCII without surrounding spaces"
            )
        total += len(name) + len(value)
    if total > _MAX_METADATA_BYTES:
        raise InvalidMetadataError(f"metadata is {total} bytes; the limit is {_MAX_METADATA_BYTES}")
    return dict(metadata)


def validate_content_type(content_type: str) -> str:
    if not content_type or _PRINTABLE_ASCII.fullmatch(content_type) is None:
        raise InvalidMetadataError(f"content type {content_type!r} must be printable ASCII")
    return content_type


def check_max_bytes(max_bytes: int) -> None:
    if max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
