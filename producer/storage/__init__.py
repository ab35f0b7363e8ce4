"""Object storage for generated audio: a local directory or an S3-compatible bucket.

Both backends implement :class:`Storage`; :func:`make_storage` picks one from
:class:`StorageSettings`. Keys come from :func:`object_key` (a request's audio, deterministic per
(tenant, request)) and :func:`reference_key` (uploaded reference audio): namespaces apart, and
unable to escape the storage root or bucket prefix.
"""

from producer.storage.base import (
    ObjectInfo,
    Storage,
    StoredObject,
    object_key,
    reference_key,
    validate_key,
)
from producer.storage.errors import (
    InvalidKeyError,
    InvalidMetadataError,
    ObjectNotFound,
    ObjectTooLarge,
    StorageError,
    UriNotAllowed,
)
from producer.storage.local import LocalStorage
from producer.storage.s3 import S3Storage
from producer.storage.settings import StorageSettings, make_storage

__all__ = [
    "InvalidKeyError",
    "InvalidMetadataError",
    "LocalStorage",
    "ObjectInfo",
    "ObjectNotFound",
    "ObjectTooLarge",
    "S3Storage",
    "Storage",
    "StorageError",
    "StorageSettings",
    "StoredObject",
    "UriNotAllowed",
    "make_storage",
    "object_key",
    "reference_key",
    "validate_key",
]
