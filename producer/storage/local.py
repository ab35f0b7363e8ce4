"""Filesystem storage under one root directory: the embedded default, no server needed.

Each object ``<root>/<key>`` has a sidecar ``<root>/<key>@meta.json`` holding its content type,
SHA-256 and custom metadata. ``@`` is outside the key alphabet, so no key can name a sidecar or
an in-flight temp file, and ``read``/``path_for`` never hand one out.
"""

import asyncio
import contextlib
import errno
import json
import os
import secrets
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from stat import S_ISREG
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit
from urllib.request import url2pathname

from producer.storage.base import (
    DEFAULT_CONTENT_TYPE,
    Lifecycle,
    ObjectInfo,
    StoredObject,
    check_max_bytes,
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

SIDECAR_SUFFIX = "@meta.json"
# Errors a later attempt may not hit again (disk full, I/O hiccup); the rest are configuration.
_TRANSIENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EAGAIN, errno.EINTR})
# Striped rather than per-key so the lock table stays bounded however many keys are written.
_LOCK_STRIPES = 64
T = TypeVar("T")


class LocalStorage(Lifecycle):
    """Objects as files under ``root``; URLs are ``file://`` paths or ``public_base_url/<key>``."""

    def __init__(self, root: Path, public_base_url: str | None = None) -> None:
        # Resolved once so containment checks compare like with like even if root is a symlink.
        self._root = Path(root).resolve()
        self._public_base_url = public_base_url.rstrip("/") if public_base_url else None
        self._locks = [asyncio.Lock() for _ in range(_LOCK_STRIPES)]

    @property
    def root(self) -> Path:
        return self._root

    async def start(self) -> None:
        await asyncio.to_thread(self._root.mkdir, parents=True, exist_ok=True)

    async def close(self) -> None:
        """Nothing to release; present for the Storage interface."""

    def path_for(self, key: str) -> Path:
        """The file behind ``key`` (for serving the directory over HTTP); validates the key."""
        return self._root / validate_key(key)

    async def put(
        self, key: str, data: bytes, content_type: str, metadata: Mapping[str, str]
    ) -> StoredObject:
        path = self.path_for(key)
        sidecar = {
            "content_type": validate_content_type(content_type),
            "size_bytes": len(data),
            "metadata": validate_metadata(metadata),
        }
        # Two in-process writers of one key could otherwise pair one's data with the other's
        # sidecar.
        async with self._locks[hash(key) % _LOCK_STRIPES]:
            digest = await self._to_thread(key, self._write, path, data, sidecar)
        url, expires_at = self._url(key, path)
        return StoredObject(
            key=key,
            storage_uri=path.as_uri(),
            url=url,
            size_bytes=len(data),
            sha256=digest,
            url_expires_at=expires_at,
        )

    async def head(self, key: str) -> ObjectInfo | None:
        path = self.path_for(key)
        return await self._to_thread(key, self._head, key, path)

    async def read(self, uri: str, max_bytes: int) -> bytes:
        check_max_bytes(max_bytes)
        return await self._to_thread(uri, self._read, uri, max_bytes)

    async def url_for(self, key: str) -> tuple[str, datetime | None]:
        """The URL for ``key`` (whether or not it exists yet); local URLs never expire."""
        return self._url(key, self.path_for(key))

    def _url(self, key: str, path: Path) -> tuple[str, datetime | None]:
        if self._public_base_url:
            return f"{self._public_base_url}/{quote(key)}", None
        return path.as_uri(), None

    def _read(self, uri: str, max_bytes: int) -> bytes:
        return _read_capped(self._path_from_uri(uri), max_bytes)

    def _path_from_uri(self, uri: str) -> Path:
        """Map a ``file://`` URI to a file inside the root, or raise UriNotAllowed."""
        parts = urlsplit(uri)
        if parts.scheme != "file" or parts.netloc not in {"", "localhost"}:
            raise UriNotAllowed(f"only file:// URIs are readable from local storage: {uri!r}")
        if parts.query or parts.fragment:
            raise UriNotAllowed(f"file URI must not have a query or fragment: {uri!r}")
        # resolve() follows symlinks and collapses "..", so containment is checked on the
        # file that would actually be opened.
        try:
            path = Path(url2pathname(parts.path)).resolve()
        except RuntimeError as exc:  # a symlink loop, before Python 3.13
            raise UriNotAllowed(f"{uri!r} does not resolve: {exc}") from exc
        if not path.is_relative_to(self._root):
            raise UriNotAllowed(f"{uri!r} is outside the storage root")
        try:
            validate_key(path.relative_to(self._root).as_posix())
        except InvalidKeyError as exc:
            raise UriNotAllowed(f"{uri!r} does not name an object") from exc
        return path

    async def _to_thread(self, what: str, func: Callable[..., T], *args: object) -> T:
        """Run blocking file I/O off the event loop, mapping OSError to StorageError."""
        try:
            return await asyncio.to_thread(func, *args)
        except OSError as exc:
            transient = exc.errno in _TRANSIENT_ERRNOS
            raise StorageError(f"{what}: {exc}", transient=transient, key=what) from exc

    def _write(self, path: Path, data: bytes, sidecar: dict[str, object]) -> str:
        """Write the object and its sidecar; returns the data's SHA-256, computed here rather
        than on the event loop (10 MB of audio, some minutes of WAV, take ~6 ms to hash)."""
        digest = sha256_hex(data)
        meta = json.dumps(sidecar | {"sha256": digest}, sort_keys=True).encode()
        directory = _open_directory(path.parent)
        try:
            if not path.parent.resolve().is_relative_to(self._root):
                # A directory inside the root was replaced by a symlink pointing elsewhere.
                raise UriNotAllowed(f"{path.parent} resolves outside the storage root")
            _replace_durably(directory, path.name, data, meta)
        finally:
            os.close(directory)
        return digest

    def _head(self, key: str, path: Path) -> ObjectInfo | None:
        try:
            stat = path.stat()
        except FileNotFoundError:
            return None
        if not S_ISREG(stat.st_mode):  # e.g. the key of a tenant's directory
            return None
        size = stat.st_size
        sidecar = _load_sidecar(_sidecar_path(path), size)
        return ObjectInfo(
            key=key,
            storage_uri=path.as_uri(),
            size_bytes=size,
            content_type=sidecar.get("content_type", DEFAULT_CONTENT_TYPE),
            sha256=sidecar.get("sha256"),
            metadata=sidecar.get("metadata", {}),
        )


def _sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def _open_directory(directory: Path) -> int:
    """A descriptor of `directory`, created first if missing."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    try:
        return os.open(directory, flags)
    except FileNotFoundError:
        directory.mkdir(parents=True, exist_ok=True)
        return os.open(directory, flags)


def _replace_durably(directory: int, name: str, data: bytes, meta: bytes) -> None:
    """Put `data` at `name` and `meta` at its sidecar, in `directory` (a descriptor), each via
    a durable temp file and an atomic rename, then persist the renames themselves.

    Everything goes through the directory's descriptor, with no buffered file objects: each
    system call is a point where this thread gives up the GIL and must win it back from the
    busy event loop, and half as many of them make a put return sooner (bench/).
    """
    sidecar = name + SIDECAR_SUFFIX
    token = secrets.token_hex(8)
    # Temp names start with "." and hold "@": never a key, never a sidecar.
    temps = {f".{name}.{token}@tmp": data, f".{sidecar}.{token}@tmp": meta}
    left = list(temps)
    try:
        for temp, content in temps.items():
            _write_new_file(directory, temp, content)
        # Drop the old sidecar first: a crash part-way leaves an object without a sidecar,
        # which head() reports as unknown checksum (safe: it gets regenerated), never an
        # object paired with a stale checksum.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sidecar, dir_fd=directory)
        for temp, final in zip(list(temps), (name, sidecar), strict=True):
            os.replace(temp, final, src_dir_fd=directory, dst_dir_fd=directory)
            left.remove(temp)
        os.fsync(directory)
    finally:
        for temp in left:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp, dir_fd=directory)


def _write_new_file(directory: int, name: str, content: bytes) -> None:
    """Create `name` in `directory` (it must not exist) holding `content`, flushed to disk."""
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666, dir_fd=directory)
    try:
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _load_sidecar(sidecar_path: Path, size: int) -> dict[str, Any]:
    """The sidecar's fields, or {} when it is missing, unreadable or describes other bytes."""
    try:
        sidecar = json.loads(sidecar_path.read_bytes())
    except (OSError, ValueError):
        return {}
    if not isinstance(sidecar, dict) or sidecar.get("size_bytes") != size:
        return {}
    return sidecar


def _read_capped(path: Path, max_bytes: int) -> bytes:
    try:
        file = path.open("rb")
    except (FileNotFoundError, IsADirectoryError) as exc:
        raise ObjectNotFound(f"{path} does not exist or is not a file", key=str(path)) from exc
    with file:
        size = os.fstat(file.fileno()).st_size
        # Read one byte past the cap too: the file may have grown since fstat.
        data = b"" if size > max_bytes else file.read(max_bytes + 1)
    if size > max_bytes or len(data) > max_bytes:
        raise ObjectTooLarge(
            f"{path} is {max(size, len(data))} bytes; the cap is {max_bytes}",
            max_bytes=max_bytes,
            key=str(path),
        )
    return data
