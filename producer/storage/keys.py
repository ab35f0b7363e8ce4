"""Object keys: deterministic, and unable to escape the storage root or bucket prefix.

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

import re
from typing import Final

from producer.storage.errors import InvalidKeyError

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
