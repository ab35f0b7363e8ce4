"""The storage interface shared by the local and S3 backends, and the checks both apply: object
keys, metadata, content types.

Object keys are deterministic, and unable to escape the storage root or bucket prefix.

Keys are ``/``-joined segments drawn from ``[A-Za-z0-9._-]`` and never ``.`` or ``..``; such a
key means the same thing as an S3 key and as a relative POSIX path, so one rule guards both
backends against traversal.

Every key starts with the fixed name of its namespace, never with an id: a request's audio is
``audio/<tenant_id>/<request_id>.<ext>``, an uploaded reference ``references/<sha256>.<ext>``.
Whatever ids a request carries, its key stays inside ``audio/`` and inside its tenant's folder,
so it cannot name a reference or another tenant's audio. Audio stored under the earlier layout,
``<tenant_id>/<request_id>.<ext>`` with no namespace, is never looked up: in that layout the
tenant ``references`` named the uploaded references.
"""

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Final, Protocol, Self

from producer.storage.errors import InvalidKeyError, InvalidMetadataError

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


# Object keys (the layout in the module's docstring).
MAX_ID_LENGTH = 128
# Room for "<id>.<extension>" while staying well under NAME_MAX (255) once the local backend
# appends its sidecar and temp-file suffixes.
MAX_SEGMENT_LENGTH = 200
AUDIO_NAMESPACE: Final = "audio"
REFERENCES_NAMESPACE: Final = "references"
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
_EXTENSION = re.compile(r"[A-Za-z0-9]{1,16}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _shown(value: str) -> str:
    """repr() of a rejected value, truncated so a hostile id cannot flood the logs."""
    return repr(value[:64]) + ("…" if len(value) > 64 else "")


def _check_segment(value: str, what: str, max_length: int) -> str:
    if (
        not 0 < len(value) <= max_length
        or value in {".", ".."}
        or _SEGMENT.fullmatch(value) is None
    ):
        raise InvalidKeyError(
            f"{what} {_shown(value)} must be 1-{max_length} characters of [A-Za-z0-9._-] "
            "and not '.' or '..'"
        )
    return value


def validate_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it is safe as one key segment (tenant id, request id), else raise."""
    return _check_segment(value, what, MAX_ID_LENGTH)


def validate_key(key: str) -> str:
    """Return ``key`` if every ``/``-separated segment is safe, else raise InvalidKeyError."""
    for segment in key.split("/"):
        _check_segment(segment, "key segment", MAX_SEGMENT_LENGTH)
    return key


def normalize_prefix(prefix: str) -> str:
    """Strip surrounding slashes and validate the rest; ``""`` means no prefix."""
    stripped = prefix.strip("/")
    return validate_key(stripped) if stripped else ""


def join_key(prefix: str, key: str) -> str:
    """Join an already-normalized prefix and an already-validated key."""
    return f"{prefix}/{key}" if prefix else key


def object_key(tenant_id: str, request_id: str, extension: str) -> str:
    """The key for a request's output: ``audio/<tenant_id>/<request_id>.<extension>``.

    Deterministic so a redelivered request overwrites its earlier object instead of adding a
    second one.
    """
    validate_id(tenant_id, "tenant_id")
    validate_id(request_id, "request_id")
    return f"{AUDIO_NAMESPACE}/{tenant_id}/{request_id}.{_extension(extension)}"


def reference_key(sha256: str, extension: str) -> str:
    """The key for uploaded reference audio: ``references/<sha256>.<extension>``, or without
    the extension when it is empty. Content-addressed: one recording, one object."""
    if _SHA256.fullmatch(sha256) is None:
        raise InvalidKeyError(f"sha256 {_shown(sha256)} must be 64 lower-case hex digits")
    if not extension.removeprefix("."):
        return f"{REFERENCES_NAMESPACE}/{sha256}"
    return f"{REFERENCES_NAMESPACE}/{sha256}.{_extension(extension)}"


def _extension(extension: str) -> str:
    """``extension`` without its leading dot, if it is 1-16 of [A-Za-z0-9]."""
    ext = extension.removeprefix(".")
    if _EXTENSION.fullmatch(ext) is None:
        raise InvalidKeyError(f"extension {_shown(extension)} must be 1-16 of [A-Za-z0-9]")
    return ext
