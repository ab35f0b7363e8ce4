"""Storage against a real filesystem and a real S3 server (MinIO, from tests/fixtures/s3.py)."""

import asyncio
import hashlib
import json
import os
import posixpath
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit
from urllib.request import url2pathname

import httpx
import pytest
from botocore.exceptions import ClientError
from hypothesis import example, given
from hypothesis import strategies as st
from pydantic import ValidationError

from producer.storage import (
    InvalidKeyError,
    InvalidMetadataError,
    LocalStorage,
    ObjectNotFound,
    ObjectTooLarge,
    S3Storage,
    Storage,
    StorageError,
    StorageSettings,
    UriNotAllowed,
    make_storage,
    object_key,
    reference_key,
    validate_key,
)
from producer.storage.local import SIDECAR_SUFFIX
from producer.storage.s3 import storage_error_from
from tests.fixtures.s3 import S3Server, free_port, running_s3_server

AUDIO = os.urandom(150_000)  # bigger than one read chunk, so capped reads loop
KEY = "tenant-a/req-1.wav"
# What `read` serves: reference audio (from its own bucket, S3 reads only these).
REFERENCE = reference_key(hashlib.sha256(AUDIO).hexdigest(), "wav")
S3_PREFIX = "audio/v1"
TRAVERSAL_KEYS = [
    "",
    ".",
    "..",
    "../escape.wav",
    "tenant/../../escape.wav",
    "tenant/./x.wav",
    "/etc/passwd",
    "tenant//x.wav",
    "tenant/",
    "tenant\\..\\x.wav",
    "tenant/x\x00.wav",
    "tenant/x .wav",
    "tenant/x@meta.json",
    "tenant/é.wav",
]


def s3_storage(server: S3Server, bucket: str, **overrides: Any) -> S3Storage:
    options: dict[str, Any] = {
        "bucket": bucket,
        "prefix": S3_PREFIX,
        "endpoint_url": server.endpoint_url,
        "region": server.region,
        "access_key_id": server.access_key_id,
        "secret_access_key": server.secret_access_key,
        "addressing_style": "path",
    }
    return S3Storage(**(options | overrides))


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def storage_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
async def storage(storage_kind: str, request: pytest.FixtureRequest) -> AsyncIterator[Storage]:
    """A started backend of each kind, empty and private to the test."""
    if storage_kind == "local":
        backend: Storage = LocalStorage(request.getfixturevalue("tmp_path") / "audio")
    else:
        server = request.getfixturevalue("s3_server")
        backend = s3_storage(server, request.getfixturevalue("s3_bucket"))
    async with backend:
        yield backend


async def download(url: str) -> bytes:
    """What a subscriber gets from the URL in an audio-ready event."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        return await asyncio.to_thread(Path(url2pathname(parts.path)).read_bytes)
    async with httpx.AsyncClient() as client:
        response = await client.get(url)
    response.raise_for_status()
    return response.content


def stored_keys(storage: Storage, request: pytest.FixtureRequest) -> list[str]:
    """Every object (data, not bookkeeping) the backend holds, as keys."""
    if isinstance(storage, LocalStorage):
        files = (p for p in storage.root.rglob("*") if p.is_file())
        return sorted(p.relative_to(storage.root).as_posix() for p in files)
    server = request.getfixturevalue("s3_server")
    listing = server.client().list_objects_v2(Bucket=storage.bucket)
    return sorted(item["Key"] for item in listing.get("Contents", []))


def sibling_uri(storage_uri: str, name: str) -> str:
    """The storage URI of another object in the same "directory"."""
    return storage_uri.rsplit("/", 1)[0] + "/" + name


# --- object_key, reference_key ----------------------------------------------------------------

SHA256 = st.from_regex(r"[0-9a-f]{64}", fullmatch=True)
# Any id the key functions accept, the names of the namespaces and checksums included.
SAFE_ID = (
    st.sampled_from(["audio", "references", "Audio", "REFERENCES"])
    | SHA256
    | st.from_regex(r"[A-Za-z0-9._-]{1,128}", fullmatch=True).filter(
        lambda value: value not in {".", ".."}
    )
)
EXTENSION = st.from_regex(r"[A-Za-z0-9]{1,16}", fullmatch=True)
# Both kinds of key from any arguments the key functions accept, tagged with what they name.
OUTPUT_ARGS = st.tuples(st.just("audio"), SAFE_ID, SAFE_ID, EXTENSION)
REFERENCE_ARGS = st.tuples(st.just("reference"), SHA256, st.just(""), EXTENSION | st.just(""))
NAMED = OUTPUT_ARGS | REFERENCE_ARGS


def key_named(named: tuple[str, str, str, str]) -> str:
    kind, first, second, extension = named
    if kind == "audio":
        return object_key(first, second, extension)
    return reference_key(first, extension)


def test_object_key_is_deterministic_and_under_audio() -> None:
    assert object_key("tenant-a", "req-1", "wav") == "audio/tenant-a/req-1.wav"
    assert object_key("tenant-a", "req-1", ".wav") == "audio/tenant-a/req-1.wav"
    assert object_key("t", "r", "mp3") == object_key("t", "r", "mp3")


def test_reference_key_is_the_checksum_under_references() -> None:
    sha = hashlib.sha256(b"voice").hexdigest()
    assert reference_key(sha, ".wav") == f"references/{sha}.wav"
    assert reference_key(sha, "") == f"references/{sha}"


@pytest.mark.parametrize(
    "bad_id",
    ["", ".", "..", "a/b", "../x", "a\\b", "a\x00b", "a b", "é", "a:b", "a\nb", "x" * 129],
)
def test_object_key_rejects_unsafe_ids(bad_id: str) -> None:
    with pytest.raises(InvalidKeyError):
        object_key(bad_id, "req", "wav")
    with pytest.raises(InvalidKeyError):
        object_key("tenant", bad_id, "wav")


def test_object_key_accepts_the_longest_id() -> None:
    assert object_key("t" * 128, "r" * 128, "wav").endswith("r" * 128 + ".wav")


@pytest.mark.parametrize("extension", ["wav/x", "", ".", "w.av", "x" * 17, "wav@meta"])
def test_key_functions_reject_a_bad_extension(extension: str) -> None:
    with pytest.raises(InvalidKeyError):
        object_key("tenant", "req", extension)
    if extension.removeprefix("."):
        with pytest.raises(InvalidKeyError):
            reference_key("0" * 64, extension)


@pytest.mark.parametrize("sha", ["", "0" * 63, "0" * 65, "A" * 64, "g" * 64, "../" + "0" * 61])
def test_reference_key_rejects_what_is_not_a_sha256(sha: str) -> None:
    with pytest.raises(InvalidKeyError):
        reference_key(sha, "wav")


def test_invalid_key_error_is_a_value_error() -> None:
    assert issubclass(InvalidKeyError, ValueError)


@given(tenant=st.text(max_size=140), request_id=st.text(max_size=140))
def test_object_key_never_leaves_its_tenants_folder(tenant: str, request_id: str) -> None:
    try:
        key = object_key(tenant, request_id, "wav")
    except InvalidKeyError:
        return
    resolved = posixpath.normpath(posixpath.join("/root", key))
    # Nothing is normalised away: the key is exactly the namespace, tenant and request ids.
    assert posixpath.relpath(resolved, "/root") == f"audio/{tenant}/{request_id}.wav"
    assert validate_key(key) == key


@given(tenant=SAFE_ID, request_id=SAFE_ID)
def test_object_key_accepts_every_safe_id(tenant: str, request_id: str) -> None:
    assert object_key(tenant, request_id, "wav") == f"audio/{tenant}/{request_id}.wav"


@given(one=NAMED, other=NAMED)
@example(one=("audio", "references", "0" * 64, "wav"), other=("reference", "0" * 64, "", "wav"))
def test_distinct_objects_never_share_a_key_nor_nest(
    one: tuple[str, str, str, str], other: tuple[str, str, str, str]
) -> None:
    """Whatever the ids: an output key is never a reference key, nor another tenant's or
    request's key, nor the "folder" of any key (a file cannot block a directory)."""
    key, other_key = key_named(one), key_named(other)
    if key == other_key:
        assert one == other
    assert not other_key.startswith(key + "/")


@given(named=NAMED)
def test_a_key_is_never_a_local_sidecar_or_temp_file(named: tuple[str, str, str, str]) -> None:
    key = key_named(named)
    assert "@" not in key  # sidecars end in "@meta.json", temp files in "@tmp"
    with pytest.raises(InvalidKeyError):
        validate_key(key + SIDECAR_SUFFIX)


@given(key=st.text(alphabet=st.sampled_from("ab./\\\x00-_é"), max_size=30))
def test_local_paths_stay_under_the_root(key: str) -> None:
    backend = LocalStorage(Path("/srv/audio"))
    try:
        path = backend.path_for(key)
    except InvalidKeyError:
        return
    assert Path(os.path.normpath(path)).is_relative_to(backend.root)
    assert path != backend.root


@pytest.mark.parametrize("key", TRAVERSAL_KEYS)
def test_validate_key_rejects_traversal(key: str) -> None:
    with pytest.raises(InvalidKeyError):
        validate_key(key)


# --- both backends ---------------------------------------------------------------------------


async def test_put_returns_a_url_that_downloads_the_exact_bytes(storage: Storage) -> None:
    stored = await storage.put(KEY, AUDIO, "audio/wav", {})

    assert stored.key == KEY
    assert stored.size_bytes == len(AUDIO)
    assert stored.sha256 == hashlib.sha256(AUDIO).hexdigest()
    assert await download(stored.url) == AUDIO


async def test_head_reports_checksum_content_type_and_metadata(storage: Storage) -> None:
    metadata = {"request-checksum": "abc123", "tenant": "tenant-a"}
    stored = await storage.put(KEY, AUDIO, "audio/wav", metadata)

    info = await storage.head(KEY)

    assert info is not None
    assert info.key == KEY
    assert info.storage_uri == stored.storage_uri
    assert info.size_bytes == len(AUDIO)
    assert info.sha256 == hashlib.sha256(AUDIO).hexdigest()
    assert info.content_type == "audio/wav"
    assert dict(info.metadata) == metadata


async def test_head_of_a_missing_key_is_none(storage: Storage) -> None:
    assert await storage.head("tenant-a/never-written.wav") is None


async def test_reput_overwrites_the_one_object(
    storage: Storage, request: pytest.FixtureRequest
) -> None:
    await storage.put(KEY, b"first take", "audio/wav", {"attempt": "1"})
    keys_after_first = stored_keys(storage, request)

    second = await storage.put(KEY, AUDIO, "audio/wav", {"attempt": "2"})

    assert stored_keys(storage, request) == keys_after_first
    info = await storage.head(KEY)
    assert info is not None
    assert (info.sha256, info.size_bytes, dict(info.metadata)) == (
        hashlib.sha256(AUDIO).hexdigest(),
        len(AUDIO),
        {"attempt": "2"},
    )
    assert await download(second.url) == AUDIO


async def test_read_by_storage_uri_up_to_the_cap(storage: Storage) -> None:
    stored = await storage.put(REFERENCE, AUDIO, "audio/wav", {})

    assert await storage.read(stored.storage_uri, max_bytes=len(AUDIO)) == AUDIO
    with pytest.raises(ObjectTooLarge) as excinfo:
        await storage.read(stored.storage_uri, max_bytes=len(AUDIO) - 1)
    assert excinfo.value.transient is False
    assert excinfo.value.max_bytes == len(AUDIO) - 1


async def test_read_of_an_empty_object(storage: Storage) -> None:
    stored = await storage.put(REFERENCE, b"", "audio/wav", {})

    assert await storage.read(stored.storage_uri, max_bytes=0) == b""
    assert await download(stored.url) == b""


async def test_read_of_a_missing_object_raises_not_found(storage: Storage) -> None:
    stored = await storage.put(REFERENCE, AUDIO, "audio/wav", {})

    with pytest.raises(ObjectNotFound) as excinfo:
        await storage.read(sibling_uri(stored.storage_uri, "missing.wav"), max_bytes=1000)
    assert excinfo.value.transient is False


async def test_read_rejects_uris_of_the_other_backend(storage: Storage) -> None:
    for uri in ["file:///etc/passwd", "s3://other-bucket/x.wav", "https://example.com/x.wav"]:
        with pytest.raises(UriNotAllowed):
            await storage.read(uri, max_bytes=1_000_000)


@pytest.mark.parametrize("key", TRAVERSAL_KEYS)
async def test_traversal_keys_are_rejected_before_any_write(
    storage: Storage, request: pytest.FixtureRequest, key: str
) -> None:
    with pytest.raises(InvalidKeyError):
        await storage.put(key, AUDIO, "audio/wav", {})
    with pytest.raises(InvalidKeyError):
        await storage.head(key)
    with pytest.raises(InvalidKeyError):
        await storage.url_for(key)
    assert stored_keys(storage, request) == []


@pytest.mark.parametrize(
    "metadata",
    [{"Upper": "x"}, {"sha256": "forged"}, {"k": "é"}, {"k": " padded"}, {"k": "x" * 2000}],
)
async def test_metadata_that_s3_would_alter_is_rejected(
    storage: Storage, metadata: dict[str, str]
) -> None:
    with pytest.raises(InvalidMetadataError):
        await storage.put(KEY, AUDIO, "audio/wav", metadata)


# --- local backend ---------------------------------------------------------------------------


async def test_local_url_is_the_absolute_file_path(tmp_path: Path) -> None:
    async with LocalStorage(tmp_path / "audio") as backend:
        stored = await backend.put(KEY, AUDIO, "audio/wav", {})

    path = (tmp_path / "audio" / KEY).resolve()
    assert stored.url == stored.storage_uri == path.as_uri()
    assert stored.url_expires_at is None
    assert path.read_bytes() == AUDIO


async def test_local_public_base_url(tmp_path: Path) -> None:
    backend = LocalStorage(tmp_path, public_base_url="http://127.0.0.1:8080/audio/")
    async with backend:
        stored = await backend.put(KEY, AUDIO, "audio/wav", {})

    assert stored.url == "http://127.0.0.1:8080/audio/tenant-a/req-1.wav"
    assert stored.url_expires_at is None
    assert stored.storage_uri == (tmp_path / KEY).resolve().as_uri()


async def test_local_put_leaves_no_temp_files(tmp_path: Path) -> None:
    async with LocalStorage(tmp_path) as backend:
        await backend.put(KEY, AUDIO, "audio/wav", {})
        await backend.put(KEY, b"again", "audio/wav", {})

    names = sorted(p.name for p in (tmp_path / "tenant-a").iterdir())
    assert names == ["req-1.wav", "req-1.wav@meta.json"]


async def test_local_object_without_its_sidecar_has_unknown_checksum(tmp_path: Path) -> None:
    """What an interrupted overwrite leaves behind must not pass an idempotency check."""
    async with LocalStorage(tmp_path) as backend:
        await backend.put(KEY, AUDIO, "audio/wav", {"request-checksum": "abc"})
        (tmp_path / f"{KEY}@meta.json").unlink()
        info = await backend.head(KEY)

    assert info is not None
    assert (info.sha256, dict(info.metadata), info.size_bytes) == (None, {}, len(AUDIO))


async def test_local_sidecar_for_other_bytes_is_ignored(tmp_path: Path) -> None:
    async with LocalStorage(tmp_path) as backend:
        await backend.put(KEY, AUDIO, "audio/wav", {})
        (tmp_path / KEY).write_bytes(b"replaced behind our back")
        info = await backend.head(KEY)

    assert info is not None
    assert info.sha256 is None


async def test_local_read_refuses_paths_outside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "audio"
    outside = tmp_path / "secret.wav"
    outside.write_bytes(b"secret")
    async with LocalStorage(root) as backend:
        stored = await backend.put(KEY, AUDIO, "audio/wav", {})
        (root / "tenant-a" / "link.wav").symlink_to(outside)
        (root / "escape").symlink_to(tmp_path)
        refused = [
            outside.as_uri(),
            f"{root.as_uri()}/../secret.wav",
            f"{root.as_uri()}/tenant-a/..%2F..%2Fsecret.wav",
            (root / "tenant-a" / "link.wav").as_uri(),
            (root / "escape" / "secret.wav").as_uri(),
            f"{stored.storage_uri}@meta.json",
            root.as_uri(),
            f"file://otherhost{root / KEY}",
            f"{stored.storage_uri}?x=1",
        ]
        for uri in refused:
            with pytest.raises(UriNotAllowed):
                await backend.read(uri, max_bytes=1_000_000)


async def test_local_directories_are_not_objects(tmp_path: Path) -> None:
    async with LocalStorage(tmp_path) as backend:
        await backend.put(KEY, AUDIO, "audio/wav", {})

        assert await backend.head("tenant-a") is None
        with pytest.raises(ObjectNotFound):
            await backend.read((tmp_path / "tenant-a").as_uri(), max_bytes=1_000_000)


async def test_local_read_follows_symlinks_that_stay_inside(tmp_path: Path) -> None:
    async with LocalStorage(tmp_path) as backend:
        await backend.put(KEY, AUDIO, "audio/wav", {})
        link = tmp_path / "tenant-a" / "alias.wav"
        link.symlink_to(tmp_path / KEY)

        assert await backend.read(link.as_uri(), max_bytes=len(AUDIO)) == AUDIO


async def test_local_put_refuses_a_directory_symlinked_out_of_the_root(tmp_path: Path) -> None:
    root, outside = tmp_path / "audio", tmp_path / "outside"
    outside.mkdir()
    async with LocalStorage(root) as backend:
        (root / "tenant-a").symlink_to(outside)
        with pytest.raises(UriNotAllowed):
            await backend.put(KEY, AUDIO, "audio/wav", {})

    assert list(outside.iterdir()) == []


async def test_local_unwritable_root_is_a_permanent_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    backend = LocalStorage(tmp_path / "file")  # a file where the root directory should be
    with pytest.raises(StorageError) as excinfo:
        await backend.put(KEY, AUDIO, "audio/wav", {})
    assert excinfo.value.transient is False


# --- S3 backend ------------------------------------------------------------------------------


async def test_s3_object_lands_under_the_prefix(s3_server: S3Server, s3_bucket: str) -> None:
    async with s3_storage(s3_server, s3_bucket) as backend:
        stored = await backend.put(KEY, AUDIO, "audio/wav", {"request-checksum": "abc"})

    raw = s3_server.client().head_object(Bucket=s3_bucket, Key=f"{S3_PREFIX}/{KEY}")
    assert stored.storage_uri == f"s3://{s3_bucket}/{S3_PREFIX}/{KEY}"
    assert raw["ContentType"] == "audio/wav"
    assert raw["Metadata"] == {"sha256": stored.sha256, "request-checksum": "abc"}


async def test_s3_presigned_url_expiry(s3_server: S3Server, s3_bucket: str) -> None:
    before = datetime.now(UTC)
    async with s3_storage(s3_server, s3_bucket, presign_expiry_seconds=900) as backend:
        stored = await backend.put(KEY, AUDIO, "audio/wav", {})

    assert stored.url_expires_at is not None
    query = parse_qs(urlsplit(stored.url).query)
    assert query["X-Amz-Expires"] == ["900"]
    signed_at = datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    # Reported expiry is never later than the real one, and at most a second earlier.
    real_expiry = signed_at + timedelta(seconds=900)
    assert timedelta(0) <= real_expiry - stored.url_expires_at <= timedelta(seconds=1)
    assert stored.url_expires_at >= before.replace(microsecond=0) + timedelta(seconds=900)


async def test_s3_presigned_url_stops_working_after_expiry(
    s3_server: S3Server, s3_bucket: str
) -> None:
    async with s3_storage(s3_server, s3_bucket, presign_expiry_seconds=1) as backend:
        stored = await backend.put(KEY, AUDIO, "audio/wav", {})
    assert stored.url_expires_at is not None

    wait = (stored.url_expires_at - datetime.now(UTC)).total_seconds() + 1.5
    await asyncio.sleep(max(wait, 0))
    async with httpx.AsyncClient() as client:
        response = await client.get(stored.url)
    assert response.status_code == 403


async def test_s3_public_base_url_serves_the_object(s3_server: S3Server, s3_bucket: str) -> None:
    """With a public-read bucket, base URL + full key downloads the object unsigned."""
    s3_server.client().put_bucket_policy(Bucket=s3_bucket, Policy=_public_read_policy(s3_bucket))
    base = f"{s3_server.endpoint_url}/{s3_bucket}/"
    async with s3_storage(s3_server, s3_bucket, public_base_url=base) as backend:
        stored = await backend.put(KEY, AUDIO, "audio/wav", {})

    assert stored.url == f"{s3_server.endpoint_url}/{s3_bucket}/{S3_PREFIX}/{KEY}"
    assert stored.url_expires_at is None
    assert await download(stored.url) == AUDIO


async def test_s3_reads_reference_audio_from_allowed_buckets_only(
    s3_server: S3Server, s3_bucket: str
) -> None:
    refs = s3_server.create_bucket()
    s3_server.client().put_object(Bucket=refs, Key="voices/ref one.wav", Body=b"reference")
    uri = f"s3://{refs}/voices/ref one.wav"

    async with s3_storage(s3_server, s3_bucket) as backend:
        with pytest.raises(UriNotAllowed):
            await backend.read(uri, max_bytes=100)
    async with s3_storage(s3_server, s3_bucket, allowed_read_buckets=[refs]) as backend:
        assert await backend.read(uri, max_bytes=100) == b"reference"
        for malformed in [f"s3://{refs}", f"s3://{refs}/", "s3:///key", f"S3://{refs}/x"]:
            with pytest.raises(UriNotAllowed):
                await backend.read(malformed, max_bytes=100)


async def test_s3_reads_from_its_own_bucket_only_references(
    s3_server: S3Server, s3_bucket: str
) -> None:
    """The rest of the bucket is the tenants' audio: a request naming one as its voice would
    clone another tenant's output. Keys outside the prefix are not this deployment's at all."""
    others = ["audio/tenant-a/req-1.wav", KEY, "references", "referencesx/voice.wav"]
    full_keys = [f"{S3_PREFIX}/{key}" for key in others] + [REFERENCE]
    for full_key in full_keys:
        s3_server.client().put_object(Bucket=s3_bucket, Key=full_key, Body=b"audio")
    # Spelled so that a server normalising the path would land in references/ or out of it.
    crafted = [f"{S3_PREFIX}/references/../{KEY}", f"{S3_PREFIX}/references//x.wav"]

    async with s3_storage(s3_server, s3_bucket, allowed_read_buckets=[s3_bucket]) as backend:
        for full_key in full_keys + crafted:
            with pytest.raises(UriNotAllowed):
                await backend.read(f"s3://{s3_bucket}/{full_key}", max_bytes=100)
        stored = await backend.put(REFERENCE, AUDIO, "audio/wav", {})
        assert await backend.read(stored.storage_uri, max_bytes=len(AUDIO)) == AUDIO


async def test_s3_object_written_elsewhere_has_unknown_checksum(
    s3_server: S3Server, s3_bucket: str
) -> None:
    s3_server.client().put_object(Bucket=s3_bucket, Key=f"{S3_PREFIX}/{KEY}", Body=b"foreign")
    async with s3_storage(s3_server, s3_bucket) as backend:
        info = await backend.head(KEY)

    assert info is not None
    assert (info.sha256, info.size_bytes, dict(info.metadata)) == (None, 7, {})


async def test_s3_missing_bucket_is_a_permanent_error(s3_server: S3Server) -> None:
    async with s3_storage(s3_server, "no-such-bucket-for-voiceclone") as backend:
        with pytest.raises(StorageError) as excinfo:
            await backend.put(KEY, AUDIO, "audio/wav", {})
        uri = f"s3://no-such-bucket-for-voiceclone/{S3_PREFIX}/{REFERENCE}"
        with pytest.raises(StorageError) as read_excinfo:
            await backend.read(uri, max_bytes=10)

    assert excinfo.value.transient is False
    assert not isinstance(excinfo.value, ObjectNotFound)
    assert "NoSuchBucket" in str(excinfo.value)
    assert read_excinfo.value.transient is False
    assert isinstance(excinfo.value.__cause__, ClientError)


async def test_s3_wrong_credentials_are_a_permanent_error(
    s3_server: S3Server, s3_bucket: str
) -> None:
    async with s3_storage(s3_server, s3_bucket, secret_access_key="wrong-secret") as backend:
        with pytest.raises(StorageError) as excinfo:
            await backend.put(KEY, AUDIO, "audio/wav", {})

    assert excinfo.value.transient is False
    assert "SignatureDoesNotMatch" in str(excinfo.value)


async def test_s3_connection_refused_is_transient(s3_server: S3Server) -> None:
    nothing_there = f"http://127.0.0.1:{free_port()}"
    backend = s3_storage(s3_server, "bucket", endpoint_url=nothing_there, max_attempts=1)
    async with backend:
        operations = [
            lambda: backend.put(KEY, AUDIO, "audio/wav", {}),
            lambda: backend.head(KEY),
            lambda: backend.read(f"s3://bucket/{S3_PREFIX}/{REFERENCE}", max_bytes=10),
        ]
        for operation in operations:
            with pytest.raises(StorageError) as excinfo:
                await operation()
            assert excinfo.value.transient is True


@pytest.mark.s3
async def test_s3_server_stopped_mid_session_is_transient(tmp_path: Path) -> None:
    with running_s3_server(tmp_path) as server:
        bucket = server.create_bucket()
        backend = s3_storage(server, bucket, max_attempts=1, connect_timeout_seconds=2)
        await backend.start()
        stored = await backend.put(REFERENCE, AUDIO, "audio/wav", {})
    try:
        with pytest.raises(StorageError) as excinfo:
            await backend.read(stored.storage_uri, max_bytes=len(AUDIO))
        assert excinfo.value.transient is True
    finally:
        await backend.close()


async def test_s3_storage_must_be_started(s3_server: S3Server, s3_bucket: str) -> None:
    backend = s3_storage(s3_server, s3_bucket)
    with pytest.raises(RuntimeError, match="not started"):
        await backend.put(KEY, AUDIO, "audio/wav", {})


def test_s3_presign_expiry_must_fit_sigv4() -> None:
    with pytest.raises(ValueError, match="presign_expiry_seconds"):
        S3Storage(bucket="b", presign_expiry_seconds=7 * 24 * 3600 + 1)


@pytest.mark.parametrize(
    ("code", "status", "transient"),
    [
        ("SlowDown", 503, True),
        ("ServiceUnavailable", 503, True),
        ("InternalError", 500, True),
        ("ThrottlingException", 400, True),
        ("RequestTimeout", 400, True),
        ("SomethingNew", 502, True),
        ("TooManyRequests", 429, True),
        ("ClientDisconnected", 499, True),  # MinIO, a request cut off by its shutdown
        ("499", 499, True),  # the same answer to a HEAD, which has no body
        ("AccessDenied", 403, False),
        ("NoSuchBucket", 404, False),
        ("InvalidArgument", 400, False),
    ],
)
def test_s3_error_codes_map_to_transient_or_permanent(
    code: str, status: int, transient: bool
) -> None:
    error = ClientError(
        {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject"
    )
    mapped = storage_error_from(error, KEY)
    assert type(mapped) is StorageError
    assert mapped.transient is transient
    assert mapped.key == KEY


@pytest.mark.parametrize("code", ["NoSuchKey", "404", "NotFound"])
def test_s3_missing_key_maps_to_object_not_found(code: str) -> None:
    error = ClientError(
        {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": 404}}, "GetObject"
    )
    mapped = storage_error_from(error, KEY)
    assert isinstance(mapped, ObjectNotFound)
    assert mapped.transient is False


# --- settings --------------------------------------------------------------------------------


async def test_make_storage_builds_a_working_local_backend(tmp_path: Path) -> None:
    settings = StorageSettings(local_root=tmp_path, public_base_url="http://h:8080/audio/")
    async with make_storage(settings) as backend:
        stored = await backend.put(KEY, AUDIO, "audio/wav", {})

    assert isinstance(backend, LocalStorage)
    assert stored.url == "http://h:8080/audio/tenant-a/req-1.wav"


async def test_make_storage_builds_a_working_s3_backend(
    s3_server: S3Server, s3_bucket: str
) -> None:
    settings = StorageSettings.model_validate(
        {
            "kind": "s3",
            "endpoint_url": s3_server.endpoint_url,
            "bucket": s3_bucket,
            "prefix": "/audio/",
            "access_key_id": s3_server.access_key_id,
            "secret_access_key": s3_server.secret_access_key,
            "addressing_style": "path",
            "presign_expiry_seconds": 60,
        }
    )
    async with make_storage(settings) as backend:
        stored = await backend.put(KEY, AUDIO, "audio/wav", {})

    assert stored.storage_uri == f"s3://{s3_bucket}/audio/{KEY}"
    assert await download(stored.url) == AUDIO


def test_settings_defaults_and_secret_hiding() -> None:
    settings = StorageSettings(secret_access_key="hunter2")  # type: ignore[arg-type]
    assert settings.kind == "local"
    assert settings.local_root == Path("var/audio")
    assert settings.presign_expiry_seconds == 3600
    assert "hunter2" not in repr(settings)
    assert "hunter2" not in settings.model_dump_json()


@pytest.mark.parametrize(
    "fields",
    [
        {"kind": "s3"},
        {"public_base_url": "ftp://example.com"},
        {"public_base_url": "not a url"},
        {"prefix": "a/../b"},
        {"presign_expiry_seconds": 0},
        {"presign_expiry_seconds": 604801},
    ],
)
def test_settings_reject_invalid_values(fields: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        StorageSettings.model_validate(fields)


def test_every_setting_is_described() -> None:
    undocumented = [n for n, f in StorageSettings.model_fields.items() if not f.description]
    assert undocumented == []


def _public_read_policy(bucket: str) -> str:
    statement = {
        "Effect": "Allow",
        "Principal": {"AWS": ["*"]},
        "Action": ["s3:GetObject"],
        "Resource": [f"arn:aws:s3:::{bucket}/*"],
    }
    return json.dumps({"Version": "2012-10-17", "Statement": [statement]})
