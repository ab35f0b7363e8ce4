"""S3-compatible object storage (AWS S3, MinIO, R2, ...) through one aiobotocore client.

Every botocore/aiohttp exception is turned into a StorageError here, with ``transient`` set
from the S3 error code or HTTP status, so callers never import botocore.
"""

from collections.abc import Iterable, Iterator, Mapping
from contextlib import AsyncExitStack, contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from urllib.parse import quote

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    CredentialRetrievalError,
    HTTPClientError,
)
from botocore.exceptions import ConnectionError as BotocoreConnectionError

from producer.storage.base import (
    DEFAULT_CONTENT_TYPE,
    REFERENCES_NAMESPACE,
    SHA256_METADATA_KEY,
    Lifecycle,
    ObjectInfo,
    StoredObject,
    check_max_bytes,
    join_key,
    normalize_prefix,
    sha256_hex,
    validate_content_type,
    validate_key,
    validate_metadata,
)
from producer.storage.errors import (
    InvalidKeyError,
    ObjectNotFound,
    ObjectTooLarge,
    StorageError,
    UriNotAllowed,
)

# SigV4 presigned URLs cannot outlive 7 days.
MAX_PRESIGN_EXPIRY_SECONDS = 7 * 24 * 3600
_READ_CHUNK_BYTES = 256 * 1024
# HEAD responses have no body, so a missing key there only shows as a bare "404".
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequests",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
        "XMinioServerNotInitialized",
        "ClientDisconnected",  # MinIO's answer to a request its own shutdown or restart cut off
    }
)
# 499: the request was cut off before it completed (a HEAD's answer has no body, so no code).
_TRANSIENT_STATUSES = frozenset({408, 429, 499})
# Transport trouble: the request may not have reached S3, or the answer did not come back.
_TRANSPORT_ERRORS = (
    HTTPClientError,
    BotocoreConnectionError,
    CredentialRetrievalError,
    aiohttp.ClientError,
    TimeoutError,
)
_BACKEND_ERRORS = (ClientError, BotoCoreError, aiohttp.ClientError, TimeoutError)

AddressingStyle = Literal["auto", "path", "virtual"]


def storage_error_from(exc: Exception, key: str | None) -> StorageError:
    """Translate a botocore/aiohttp exception into a typed StorageError."""
    if isinstance(exc, ClientError):
        return _from_client_error(exc, key)
    transient = isinstance(exc, _TRANSPORT_ERRORS)
    # Anything else (no credentials, invalid parameters) needs a fix, not a retry.
    return StorageError(f"S3 {key}: {exc}", transient=transient, key=key)


def _from_client_error(exc: ClientError, key: str | None) -> StorageError:
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
    message = f"S3 {exc.operation_name} {key}: {code or 'error'} (HTTP {status})"
    if code in _NOT_FOUND_CODES:
        return ObjectNotFound(message, key=key)
    transient = code in _TRANSIENT_CODES or status >= 500 or status in _TRANSIENT_STATUSES
    return StorageError(message, transient=transient, key=key)


@contextmanager
def _errors_mapped(key: str) -> Iterator[None]:
    try:
        yield
    except _BACKEND_ERRORS as exc:
        raise storage_error_from(exc, key) from exc


class S3Storage(Lifecycle):
    """Objects under ``prefix`` in ``bucket``; URLs are presigned GETs or ``public_base_url``.

    ``read`` serves reference audio: from ``bucket`` only what lies in its references
    namespace, from ``allowed_read_buckets`` anything.

    ``public_base_url`` must serve the bucket root: the URL is it plus the full object key,
    prefix included. Credentials left unset fall back to botocore's usual chain (environment,
    config files, instance role).
    """

    def __init__(
        self,
        *,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        presign_expiry_seconds: int = 3600,
        public_base_url: str | None = None,
        allowed_read_buckets: Iterable[str] = (),
        addressing_style: AddressingStyle = "auto",
        connect_timeout_seconds: float = 5.0,
        read_timeout_seconds: float = 60.0,
        max_attempts: int = 3,
    ) -> None:
        if not 1 <= presign_expiry_seconds <= MAX_PRESIGN_EXPIRY_SECONDS:
            raise ValueError(
                f"presign_expiry_seconds must be 1..{MAX_PRESIGN_EXPIRY_SECONDS}, "
                f"got {presign_expiry_seconds}"
            )
        self._bucket = bucket
        self._prefix = normalize_prefix(prefix)
        self._references_prefix = join_key(self._prefix, REFERENCES_NAMESPACE)
        self._presign_expiry = presign_expiry_seconds
        self._public_base_url = public_base_url.rstrip("/") if public_base_url else None
        self._readable_buckets = frozenset({bucket, *allowed_read_buckets})
        self._client_args: dict[str, Any] = {
            "endpoint_url": endpoint_url,
            "region_name": region,
            "aws_access_key_id": access_key_id,
            "aws_secret_access_key": secret_access_key,
            "config": AioConfig(
                signature_version="s3v4",
                s3={"addressing_style": addressing_style},
                # botocore's standard mode already retries throttling and 5xx with backoff;
                # what still fails after that reaches the caller as transient.
                retries={"mode": "standard", "total_max_attempts": max_attempts},
                connect_timeout=connect_timeout_seconds,
                read_timeout=read_timeout_seconds,
            ),
        }
        self._stack: AsyncExitStack | None = None
        self._client: Any = None

    @property
    def bucket(self) -> str:
        return self._bucket

    async def start(self) -> None:
        """Open the client (one connection pool for this object's lifetime)."""
        if self._stack is not None:
            return
        stack = AsyncExitStack()
        client_context = get_session().create_client("s3", **self._client_args)
        self._client = await stack.enter_async_context(client_context)
        self._stack = stack

    async def close(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    async def put(
        self, key: str, data: bytes, content_type: str, metadata: Mapping[str, str]
    ) -> StoredObject:
        full_key = self._full_key(key)
        digest = sha256_hex(data)
        user_metadata = validate_metadata(metadata) | {SHA256_METADATA_KEY: digest}
        client = self._started_client()
        with _errors_mapped(key):
            await client.put_object(
                Bucket=self._bucket,
                Key=full_key,
                Body=data,
                ContentType=validate_content_type(content_type),
                Metadata=user_metadata,
            )
        url, expires_at = await self.url_for(key)
        return StoredObject(
            key=key,
            storage_uri=self._uri(full_key),
            url=url,
            size_bytes=len(data),
            sha256=digest,
            url_expires_at=expires_at,
        )

    async def head(self, key: str) -> ObjectInfo | None:
        full_key = self._full_key(key)
        client = self._started_client()
        try:
            with _errors_mapped(key):
                response = await client.head_object(Bucket=self._bucket, Key=full_key)
        except ObjectNotFound:
            return None
        metadata = dict(response.get("Metadata", {}))
        return ObjectInfo(
            key=key,
            storage_uri=self._uri(full_key),
            size_bytes=int(response["ContentLength"]),
            content_type=response.get("ContentType", DEFAULT_CONTENT_TYPE),
            sha256=metadata.pop(SHA256_METADATA_KEY, None),
            metadata=metadata,
        )

    async def read(self, uri: str, max_bytes: int) -> bytes:
        check_max_bytes(max_bytes)
        bucket, key = self._parse_uri(uri)
        client = self._started_client()
        with _errors_mapped(uri):
            response = await client.get_object(Bucket=bucket, Key=key)
            async with response["Body"] as body:
                size = int(response["ContentLength"])
                if size > max_bytes:
                    raise ObjectTooLarge(
                        f"{uri} is {size} bytes; the cap is {max_bytes}",
                        max_bytes=max_bytes,
                        key=uri,
                    )
                return await _read_at_most(body, max_bytes, uri)

    async def url_for(self, key: str) -> tuple[str, datetime | None]:
        """A download URL for ``key``; presigned URLs are valid from the signing second on."""
        full_key = self._full_key(key)
        if self._public_base_url:
            return f"{self._public_base_url}/{quote(full_key)}", None
        client = self._started_client()
        # SigV4 signs whole seconds; truncating here keeps the reported expiry no later than
        # the real one.
        signed_at = datetime.now(UTC).replace(microsecond=0)
        with _errors_mapped(key):
            url = await client.generate_presigned_url(
                "get_object",
                Params={"Bucket": self._bucket, "Key": full_key},
                ExpiresIn=self._presign_expiry,
            )
        return url, signed_at + timedelta(seconds=self._presign_expiry)

    def _full_key(self, key: str) -> str:
        return join_key(self._prefix, validate_key(key))

    def _uri(self, full_key: str) -> str:
        return f"s3://{self._bucket}/{full_key}"

    def _parse_uri(self, uri: str) -> tuple[str, str]:
        """``s3://bucket/key`` to (bucket, key), taken literally as the AWS CLI writes them."""
        if not uri.startswith("s3://"):
            raise UriNotAllowed(f"only s3:// URIs are readable from S3 storage: {uri!r}")
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        if not bucket or not key:
            raise UriNotAllowed(f"S3 URI needs a bucket and a key: {uri!r}")
        if bucket not in self._readable_buckets:
            raise UriNotAllowed(f"bucket {bucket!r} is not readable by this worker")
        if bucket == self._bucket and not self._is_reference(key):
            # The rest of this bucket is the tenants' audio: no request may clone one's.
            raise UriNotAllowed(
                f"in bucket {bucket!r} only {self._references_prefix}/ is readable: {uri!r}"
            )
        return bucket, key

    def _is_reference(self, full_key: str) -> bool:
        """Whether ``full_key`` lies in this backend's references namespace, literally: no
        ``..`` or empty segment that a server could normalise out of it."""
        if not full_key.startswith(f"{self._references_prefix}/"):
            return False
        try:
            validate_key(full_key)
        except InvalidKeyError:
            return False
        return True

    def _started_client(self) -> Any:
        if self._client is None:
            raise RuntimeError("S3Storage is not started: use `async with` or await start()")
        return self._client


async def _read_at_most(body: Any, max_bytes: int, uri: str) -> bytes:
    """Read the body, failing as soon as it exceeds ``max_bytes`` even if Content-Length lied."""
    chunks: list[bytes] = []
    total = 0
    while chunk := await body.read(_READ_CHUNK_BYTES):
        total += len(chunk)
        if total > max_bytes:
            raise ObjectTooLarge(
                f"{uri} exceeds the cap of {max_bytes} bytes", max_bytes=max_bytes, key=uri
            )
        chunks.append(chunk)
    return b"".join(chunks)
