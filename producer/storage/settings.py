"""Storage settings (nested into the worker settings as ``storage``) and the backend factory."""

from pathlib import Path
from typing import Annotated, Literal, Self
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator

from producer.caseless import CaseInsensitive
from producer.storage.base import Storage, normalize_prefix
from producer.storage.local import LocalStorage
from producer.storage.s3 import MAX_PRESIGN_EXPIRY_SECONDS, AddressingStyle, S3Storage


class StorageSettings(BaseModel):
    """Where generated audio is written and how subscribers download it."""

    kind: Annotated[Literal["local", "s3"], CaseInsensitive()] = Field(
        default="local",
        description="Storage backend: `local` (files under `local_root`, no server needed) or "
        "`s3` (any S3-compatible object store).",
    )
    local_root: Path = Field(
        default=Path("./var/audio"),
        description="Directory that holds objects when `kind` is `local`.",
    )
    public_base_url: str | None = Field(
        default=None,
        description="Base URL that serves `local_root` (local) or the bucket root (s3). Set: "
        "audio URLs are this plus the object key and never expire. Unset: `file://` paths "
        "(local) or presigned GET URLs (s3).",
    )
    endpoint_url: str | None = Field(
        default=None,
        description="S3 endpoint, e.g. `http://127.0.0.1:9000` for MinIO. Unset: AWS S3 for "
        "`region`.",
    )
    bucket: str | None = Field(
        default=None, description="S3 bucket for generated audio (s3: required)."
    )
    prefix: str = Field(
        default="",
        description="Key prefix inside the bucket, e.g. `voiceclone/audio`; empty for none.",
    )
    region: str = Field(default="us-east-1", description="S3 region, also used to sign requests.")
    access_key_id: str | None = Field(
        default=None,
        description="S3 access key id. Unset: botocore's default chain (AWS_* environment "
        "variables, ~/.aws files, instance role).",
    )
    secret_access_key: SecretStr | None = Field(
        default=None, description="S3 secret access key, paired with `access_key_id`."
    )
    presign_expiry_seconds: int = Field(
        default=3600,
        ge=1,
        le=MAX_PRESIGN_EXPIRY_SECONDS,
        description="Lifetime of presigned download URLs in seconds (at most 7 days).",
    )
    allowed_read_buckets: list[str] = Field(
        default_factory=list,
        description="Buckets besides `bucket` whose `s3://` URIs the worker may read reference "
        'audio from (JSON list in the environment, e.g. `["refs"]`). In `bucket` itself only '
        "keys under `<prefix>/references/` are readable: the rest is the tenants' audio.",
    )
    addressing_style: Annotated[AddressingStyle, CaseInsensitive()] = Field(
        default="auto",
        description="S3 URL style: `path` (bucket in the path; MinIO by hostname), `virtual` "
        "(bucket in the hostname) or `auto`.",
    )
    connect_timeout_seconds: float = Field(
        default=5.0, gt=0, description="Timeout for opening a connection to S3."
    )
    read_timeout_seconds: float = Field(
        default=60.0, gt=0, description="Timeout for reading an S3 response."
    )
    max_attempts: int = Field(
        default=3,
        ge=1,
        description="Attempts per S3 request, first included; throttling, 5xx and connection "
        "errors are retried with backoff.",
    )

    @field_validator("prefix")
    @classmethod
    def _normalize_prefix(cls, prefix: str) -> str:
        return normalize_prefix(prefix)

    @field_validator("public_base_url")
    @classmethod
    def _check_public_base_url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        parts = urlsplit(url)
        if parts.scheme not in {"http", "https"} or not parts.netloc:
            raise ValueError(f"public_base_url must be an http(s) URL, got {url!r}")
        return url.rstrip("/")

    @model_validator(mode="after")
    def _require_bucket_for_s3(self) -> Self:
        if self.kind == "s3" and not self.bucket:
            raise ValueError("storage kind 's3' needs a bucket")
        return self


def make_storage(settings: StorageSettings) -> Storage:
    """The configured backend, not yet started: use ``async with`` or ``await start()``."""
    if settings.kind == "local":
        return LocalStorage(settings.local_root, public_base_url=settings.public_base_url)
    assert settings.bucket is not None  # guaranteed by the model validator
    secret = settings.secret_access_key
    return S3Storage(
        bucket=settings.bucket,
        prefix=settings.prefix,
        endpoint_url=settings.endpoint_url,
        region=settings.region,
        access_key_id=settings.access_key_id,
        secret_access_key=secret.get_secret_value() if secret else None,
        presign_expiry_seconds=settings.presign_expiry_seconds,
        public_base_url=settings.public_base_url,
        allowed_read_buckets=settings.allowed_read_buckets,
        addressing_style=settings.addressing_style,
        connect_timeout_seconds=settings.connect_timeout_seconds,
        read_timeout_seconds=settings.read_timeout_seconds,
        max_attempts=settings.max_attempts,
    )
