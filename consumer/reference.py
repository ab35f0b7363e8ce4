"""Fetching the reference voice audio of a clone request, safely.

A request names its reference audio by URI, and whoever writes requests chooses that URI, so
the fetch is an SSRF surface: the worker sits inside the network with access to metadata
endpoints and internal services. Hence:

* only configured schemes, hosts and buckets; ``file://`` only below a configured root;
* http(s) hosts are resolved first and every address must be public (no loopback, private,
  link-local incl. 169.254.169.254, unique-local, multicast, ...) before anything connects;
  the connection then goes to the vetted address (Host header and TLS SNI keep the name), so
  a second DNS answer cannot swap in an internal address (DNS rebinding);
* redirects are followed by hand, each hop checked like the first;
* bodies are capped while streaming, checksums verified, and the bytes must decode as audio
  no longer than allowed.

Results are cached per worker (LRU by entries and bytes) and concurrent fetches of the same
reference share one download, because a popular voice is requested many times.
"""

import asyncio
import errno
import functools
import hashlib
import hmac
import io
import ipaddress
import math
import os
import socket
import stat
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Self
from urllib.parse import unquote, urlsplit

import httpx
import numpy as np
import soundfile as sf
from pydantic import BaseModel, Field, field_validator, model_validator

from schemas.vocabulary import ErrorCode, VoicecloneError

__all__ = [
    "SUPPORTED_SCHEMES",
    "ObjectReader",
    "ReferenceAudio",
    "ReferenceFetchError",
    "ReferenceFetcher",
    "ReferenceInvalid",
    "ReferenceSettings",
    "ReferenceUnavailable",
    "is_public_address",
    "redact_uri",
]

SUPPORTED_SCHEMES = frozenset({"http", "https", "s3", "file"})
_HTTP_SCHEMES = frozenset({"http", "https"})
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_NOT_FOUND_STATUSES = frozenset({404, 410})
_TRANSIENT_STATUSES = frozenset({408, 425, 429})
_MAX_URI_CHARS = 8192
_MAX_PORT = 65535
_SHOWN_URI_CHARS = 160
_DECODE_BLOCK_SAMPLES = 1 << 18  # per channel-interleaved block: about 1 MiB of float32
# 64:ff9b::/96 (NAT64) carries an IPv4 address that the gateway would connect to.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
CacheKey = tuple[str, str | None]


class ReferenceSettings(BaseModel):
    """Where reference voice audio may come from, and how much of it is accepted."""

    allowed_schemes: list[str] = Field(
        default=["https", "s3"],
        description="URI schemes a reference may use, of http, https, s3 and file. `file` also "
        "needs `file_root`; plain `http` is off by default.",
    )
    allowed_hosts: list[str] = Field(
        default=[],
        description='Hosts http(s) references may name: exact names or "*.example.com" for any '
        "subdomain. Empty: any host whose addresses are all public.",
    )
    allowed_buckets: list[str] = Field(
        default=[],
        description="Buckets s3:// references may name. Empty: any bucket the worker's "
        "credentials can read.",
    )
    file_root: Path | None = Field(
        default=None,
        description="Directory that file:// references must resolve inside (symlinks followed). "
        "Unset: no file references.",
    )
    max_bytes: int = Field(
        default=20_000_000, ge=1, description="Largest reference file accepted, in bytes."
    )
    max_duration_seconds: float = Field(
        default=60.0, gt=0, description="Longest reference audio accepted, in seconds."
    )
    timeout_seconds: float = Field(
        default=15.0,
        gt=0,
        description="Time allowed for one reference download, redirects and DNS included.",
    )
    max_redirects: int = Field(
        default=3, ge=0, description="HTTP redirects followed per download; each hop is re-checked."
    )
    cache_entries: int = Field(
        default=256, ge=0, description="References kept in memory per worker; 0 disables the cache."
    )
    cache_max_bytes: int = Field(
        default=256 * 1024 * 1024, ge=0, description="Total size of cached references, in bytes."
    )
    cache_ttl_seconds: float = Field(
        default=3600.0,
        gt=0,
        description="How long a reference fetched without a checksum stays cached (its URI may "
        "be overwritten). References pinned by sha256 stay until evicted.",
    )
    allow_private_networks: bool = Field(
        default=False,
        description="Allow http(s) references on loopback, private and link-local addresses. "
        "Only for development and tests: it disables the SSRF protection.",
    )

    @field_validator("allowed_schemes")
    @classmethod
    def _known_schemes(cls, schemes: list[str]) -> list[str]:
        normalised = [scheme.strip().lower() for scheme in schemes]
        unknown = sorted(set(normalised) - SUPPORTED_SCHEMES)
        if unknown:
            raise ValueError(f"unsupported schemes {unknown}; use {sorted(SUPPORTED_SCHEMES)}")
        return normalised

    @field_validator("allowed_hosts")
    @classmethod
    def _host_patterns(cls, hosts: list[str]) -> list[str]:
        patterns = [host.strip().lower().rstrip(".") for host in hosts]
        for pattern in patterns:
            if not pattern.removeprefix("*.") or "*" in pattern.removeprefix("*."):
                raise ValueError(f'bad host pattern {pattern!r}: use "name" or "*.domain"')
        return patterns

    @model_validator(mode="after")
    def _file_needs_root(self) -> Self:
        if "file" in self.allowed_schemes and self.file_root is None:
            raise ValueError("the file scheme is allowed but file_root is not set")
        return self


class ReferenceFetchError(VoicecloneError):
    """The reference audio cannot be used.

    ``reason`` is a short code fit for metrics and outcome events; ``transient`` says whether
    trying again later may succeed. Messages never carry query strings or credentials.
    """

    def __init__(self, message: str, *, reason: str, transient: bool = False) -> None:
        super().__init__(message, transient=transient)
        self.reason = reason


class ReferenceUnavailable(ReferenceFetchError):
    """Could not be fetched: refused by policy, not found, or a network or storage failure.

    Reasons: bad_uri, forbidden, blocked_address, not_found, http_status, too_many_redirects,
    network, timeout, storage.
    """

    code = ErrorCode.REFERENCE_AUDIO_UNAVAILABLE


class ReferenceInvalid(ReferenceFetchError):
    """Fetched, but unusable: too large, too long, not audio, or not the expected checksum.

    Reasons: too_large, too_long, not_audio, checksum_mismatch, bad_checksum. Never transient.
    """

    code = ErrorCode.REFERENCE_AUDIO_INVALID

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message, reason=reason, transient=False)


@dataclass(frozen=True, slots=True)
class ReferenceAudio:
    """A vetted reference: the original file bytes and what decoding them found."""

    data: bytes = field(repr=False)
    sha256: str
    duration_seconds: float
    sample_rate: int
    channels: int
    format: str

    def decode(self) -> tuple[np.ndarray, int]:
        """Float32 samples (frames, or frames x channels) and the sample rate. Blocking."""
        samples, sample_rate = sf.read(io.BytesIO(self.data), dtype="float32")
        return samples, sample_rate


class ObjectReader(Protocol):
    """Reads s3:// objects; the storage layer implements it.

    Errors it raises that carry a ``transient: bool`` attribute become ReferenceUnavailable;
    anything else propagates unchanged.
    """

    async def read(self, uri: str, max_bytes: int) -> bytes: ...


def is_public_address(address: IPAddress) -> bool:
    """Whether connecting to an address cannot reach anything internal: global unicast only."""
    embedded = _embedded_ipv4(address)
    if embedded is not None:
        return is_public_address(embedded)
    if isinstance(address, ipaddress.IPv6Address) and address.is_site_local:
        return False
    return address.is_global and not (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    )


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one really leads to (mapped, NAT64, 6to4), if any."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


def redact_uri(uri: str) -> str:
    """A URI fit for messages and logs: no credentials or query (presigned URLs carry
    signatures there), printable, and short."""
    try:
        parts = urlsplit(uri)
        host = parts.hostname or ""
    except ValueError:
        return "<malformed uri>"
    shown = f"{parts.scheme}://{host}{parts.path}" if parts.scheme else parts.path
    shown = "".join(char if char.isprintable() else "?" for char in shown)
    if len(shown) > _SHOWN_URI_CHARS:
        return shown[: _SHOWN_URI_CHARS - 3] + "..."
    return shown


def _host_allowed(host: str, patterns: list[str]) -> bool:
    if not patterns:
        return True
    host = host.lower().rstrip(".")
    return any(
        host.endswith(pattern[1:]) if pattern.startswith("*.") else host == pattern
        for pattern in patterns
    )


async def _resolve_host(host: str, port: int) -> list[IPAddress]:
    """Every address a name resolves to, in resolver order, without duplicates."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except UnicodeError as exc:  # the idna codec refuses an empty or over-long label
        raise ReferenceUnavailable(
            f"host {host[:100]!r} is not a valid name", reason="bad_uri"
        ) from exc
    except socket.gaierror as exc:
        missing = exc.errno in {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", None)}
        raise ReferenceUnavailable(
            f"cannot resolve host {host[:100]!r}",
            reason="not_found" if missing else "network",
            transient=not missing,
        ) from exc
    addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    return list(dict.fromkeys(addresses))


def _normalise_digest(expected_sha256: str | None) -> str | None:
    if expected_sha256 is None:
        return None
    digest = expected_sha256.strip().lower()
    if len(digest) != 64 or any(char not in "0123456789abcdef" for char in digest):
        raise ReferenceInvalid("expected sha256 is not 64 hex digits", reason="bad_checksum")
    return digest


class _Cache:
    """LRU of vetted references, bounded by entries and bytes; unpinned entries expire."""

    def __init__(self, settings: ReferenceSettings, clock: Callable[[], float]) -> None:
        self._max_entries = settings.cache_entries
        self._max_bytes = settings.cache_max_bytes
        self._ttl = settings.cache_ttl_seconds
        self._clock = clock
        self._entries: OrderedDict[CacheKey, tuple[ReferenceAudio, float]] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: CacheKey) -> ReferenceAudio | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        audio, expires_at = entry
        if self._clock() >= expires_at:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return audio

    def put(self, key: CacheKey, audio: ReferenceAudio) -> None:
        size = len(audio.data)
        if self._max_entries == 0 or size > self._max_bytes:
            return
        self._drop(key)
        # A checksum pins the content, so only URI-keyed entries can go stale.
        expires_at = math.inf if key[1] is not None else self._clock() + self._ttl
        self._entries[key] = (audio, expires_at)
        self._bytes += size
        while len(self._entries) > self._max_entries or self._bytes > self._max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: CacheKey) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= len(entry[0].data)


class ReferenceFetcher:
    """Fetches, vets, caches and shares reference audio. One per worker; close it when done."""

    def __init__(
        self,
        settings: ReferenceSettings,
        *,
        object_reader: ObjectReader | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._object_reader = object_reader
        self._cache = _Cache(settings, clock)
        self._inflight: dict[CacheKey, asyncio.Task[ReferenceAudio]] = {}
        self._client = httpx.AsyncClient(
            transport=transport,
            timeout=settings.timeout_seconds,
            follow_redirects=False,  # each hop is vetted by hand
            trust_env=False,  # an environment proxy would bypass the address checks
            # No reuse: a pooled connection is keyed by IP and could serve another name.
            limits=httpx.Limits(max_keepalive_connections=0),
            # Compressed bodies could expand far past the size cap in one chunk.
            headers={"Accept-Encoding": "identity", "User-Agent": "voiceclone-worker"},
            event_hooks={"response": [_refuse_malformed_redirect]},
        )
        self._readers: dict[str, Callable[[str], Awaitable[bytes]]] = {
            "http": self._read_http,
            "https": self._read_http,
            "s3": self._read_s3,
            "file": self._read_file,
        }

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Cancel downloads in flight and close the HTTP client."""
        for task in list(self._inflight.values()):
            task.cancel()
        await self._client.aclose()

    @property
    def cached(self) -> int:
        """References held in the cache."""
        return len(self._cache)

    async def fetch(self, uri: str, expected_sha256: str | None = None) -> ReferenceAudio:
        """The vetted reference audio at ``uri``; raises a ReferenceFetchError subclass.

        With ``expected_sha256`` the bytes must match it. Concurrent calls for the same
        reference share one download; a caller's cancellation does not cancel it for others.
        """
        key = (uri, _normalise_digest(expected_sha256))
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._load(*key), name="reference-fetch")
            self._inflight[key] = task
            task.add_done_callback(functools.partial(self._settle, key))
        return await asyncio.shield(task)

    def _settle(self, key: CacheKey, task: asyncio.Task[ReferenceAudio]) -> None:
        self._inflight.pop(key, None)
        # Failures are not cached: a transient one should be retried.
        if not task.cancelled() and task.exception() is None:
            self._cache.put(key, task.result())

    async def _load(self, uri: str, expected_sha256: str | None) -> ReferenceAudio:
        data = await self._read_bytes(uri)
        return await asyncio.to_thread(
            _vet_audio, data, expected_sha256, self._settings.max_duration_seconds
        )

    async def _read_bytes(self, uri: str) -> bytes:
        if len(uri) > _MAX_URI_CHARS:
            raise ReferenceUnavailable("reference URI is too long", reason="bad_uri")
        try:
            scheme = urlsplit(uri).scheme.lower()
        except ValueError as exc:
            raise ReferenceUnavailable("reference URI is malformed", reason="bad_uri") from exc
        if scheme not in self._settings.allowed_schemes:
            raise ReferenceUnavailable(
                f"scheme {scheme[:20]!r} is not allowed for references", reason="forbidden"
            )
        timeout = self._settings.timeout_seconds
        try:
            async with asyncio.timeout(timeout):
                data = await self._readers[scheme](uri)
        except TimeoutError as exc:
            raise ReferenceUnavailable(
                f"fetching {redact_uri(uri)} took longer than {timeout:g}s",
                reason="timeout",
                transient=True,
            ) from exc
        _check_size(len(data), self._settings.max_bytes)
        return data

    # http(s)

    async def _read_http(self, uri: str) -> bytes:
        try:
            url = httpx.URL(uri)
        except httpx.InvalidURL as exc:
            raise ReferenceUnavailable("reference URI is malformed", reason="bad_uri") from exc
        try:
            return await self._follow(url)
        except httpx.TimeoutException as exc:
            raise ReferenceUnavailable(
                f"timed out fetching {redact_uri(uri)}", reason="timeout", transient=True
            ) from exc
        except httpx.TransportError as exc:
            raise ReferenceUnavailable(
                f"network error fetching {redact_uri(uri)}: {type(exc).__name__}",
                reason="network",
                transient=True,
            ) from exc

    async def _follow(self, url: httpx.URL) -> bytes:
        for _ in range(self._settings.max_redirects + 1):
            addresses = await self._vet_http_url(url)
            response = await self._send(url, addresses)
            try:
                location = _redirect_target(response, url)
                if location is None:
                    return await self._read_body(response, url)
            finally:
                await response.aclose()
            url = location
        raise ReferenceUnavailable(
            f"more than {self._settings.max_redirects} redirects", reason="too_many_redirects"
        )

    async def _vet_http_url(self, url: httpx.URL) -> list[IPAddress]:
        """The addresses a URL may be fetched from; refuses anything the policy forbids."""
        if url.scheme not in _HTTP_SCHEMES or url.scheme not in self._settings.allowed_schemes:
            raise ReferenceUnavailable(
                f"scheme {url.scheme[:20]!r} is not allowed for references", reason="forbidden"
            )
        if url.userinfo:
            raise ReferenceUnavailable(
                "credentials in reference URIs are not allowed", reason="forbidden"
            )
        if url.port is not None and not 0 < url.port <= _MAX_PORT:
            # Left to the socket layer it would raise OverflowError, not a network error.
            raise ReferenceUnavailable(f"port {url.port} is out of range", reason="bad_uri")
        if not url.host or not _host_allowed(url.host, self._settings.allowed_hosts):
            raise ReferenceUnavailable(
                f"host {url.host[:100]!r} is not allowed for references", reason="forbidden"
            )
        addresses = await self._addresses(url)
        if not self._settings.allow_private_networks:
            blocked = [address for address in addresses if not is_public_address(address)]
            if blocked:
                # The address stays out of the message: it would map the internal network.
                raise ReferenceUnavailable(
                    f"host {url.host[:100]!r} resolves to a non-public address",
                    reason="blocked_address",
                )
        return addresses

    @staticmethod
    async def _addresses(url: httpx.URL) -> list[IPAddress]:
        try:
            return [ipaddress.ip_address(url.host)]
        except ValueError:
            pass  # a name, not a literal address
        port = url.port or (443 if url.scheme == "https" else 80)
        return await _resolve_host(url.raw_host.decode("ascii"), port)

    async def _send(self, url: httpx.URL, addresses: list[IPAddress]) -> httpx.Response:
        """GET from the first vetted address that accepts a connection."""
        extensions = {}
        if url.scheme == "https":
            # The certificate is checked against the name, not the address we dial.
            extensions["sni_hostname"] = url.raw_host.decode("ascii")
        failure: httpx.ConnectError | None = None
        for address in addresses:
            request = self._client.build_request(
                "GET",
                url.copy_with(host=str(address)),
                headers={"Host": url.netloc.decode("ascii")},
                extensions=extensions,
            )
            try:
                return await self._client.send(request, stream=True)
            except httpx.ConnectError as exc:
                failure = exc
        assert failure is not None  # addresses is never empty
        raise failure

    async def _read_body(self, response: httpx.Response, url: httpx.URL) -> bytes:
        _check_status(response.status_code, url)
        max_bytes = self._settings.max_bytes
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit():
            _check_size(int(declared), max_bytes)
        chunks: list[bytes] = []
        received = 0
        async for chunk in response.aiter_bytes():
            received += len(chunk)
            _check_size(received, max_bytes)  # stops the download at the cap
            chunks.append(chunk)
        return b"".join(chunks)

    # s3 and file

    async def _read_s3(self, uri: str) -> bytes:
        parts = urlsplit(uri)
        bucket, key = parts.netloc, parts.path.lstrip("/")
        if not bucket or not key:
            raise ReferenceUnavailable("s3 URI needs a bucket and a key", reason="bad_uri")
        allowed = self._settings.allowed_buckets
        if allowed and bucket not in allowed:
            raise ReferenceUnavailable(
                f"bucket {bucket[:100]!r} is not allowed for references", reason="forbidden"
            )
        if self._object_reader is None:
            raise ReferenceUnavailable("no object storage is configured", reason="forbidden")
        try:
            return await self._object_reader.read(uri, self._settings.max_bytes)
        except Exception as exc:
            transient = getattr(exc, "transient", None)
            if isinstance(exc, ReferenceFetchError) or not isinstance(transient, bool):
                raise
            raise ReferenceUnavailable(
                f"object storage could not read {redact_uri(uri)}: {type(exc).__name__}",
                reason="storage",
                transient=transient,
            ) from exc

    async def _read_file(self, uri: str) -> bytes:
        path = self._local_path(uri)
        try:
            return await asyncio.to_thread(_read_regular_file, path, self._settings.max_bytes)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise ReferenceUnavailable(
                f"{redact_uri(uri)} does not exist", reason="not_found"
            ) from exc
        except PermissionError as exc:
            raise ReferenceUnavailable(
                f"{redact_uri(uri)} is not readable", reason="forbidden"
            ) from exc
        except OSError as exc:
            raise ReferenceUnavailable(
                f"cannot read {redact_uri(uri)}: {errno.errorcode.get(exc.errno or 0, 'error')}",
                reason="storage",
                transient=True,
            ) from exc

    def _local_path(self, uri: str) -> Path:
        """The file a file:// URI names, after symlinks, if it lies inside the root."""
        parts = urlsplit(uri)
        raw = unquote(parts.path)
        if parts.netloc not in ("", "localhost") or not raw.startswith("/") or "\0" in raw:
            raise ReferenceUnavailable("file URI must be file:///absolute/path", reason="bad_uri")
        root = self._settings.file_root
        assert root is not None  # the settings refuse "file" without a root
        try:
            path = Path(raw).resolve()
        except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
            raise ReferenceUnavailable(
                f"cannot resolve {redact_uri(uri)}", reason="forbidden"
            ) from exc
        if not path.is_relative_to(root.resolve()):
            raise ReferenceUnavailable(
                f"{redact_uri(uri)} is outside the reference root", reason="forbidden"
            )
        return path


async def _refuse_malformed_redirect(response: httpx.Response) -> None:
    """httpx parses a redirect's Location even when not following it, and reports a malformed
    one as a transport error (transient: retried); it is the server's answer, so refuse it
    here, before httpx looks."""
    location = response.headers.get("Location")
    if response.status_code not in _REDIRECT_STATUSES or location is None:
        return
    try:
        httpx.URL(location)
    except httpx.InvalidURL as exc:
        raise ReferenceUnavailable("redirect to a malformed URI", reason="bad_uri") from exc


def _redirect_target(response: httpx.Response, url: httpx.URL) -> httpx.URL | None:
    """Where a redirect points, or None when the response is not a redirect."""
    if response.status_code not in _REDIRECT_STATUSES:
        return None
    location = response.headers.get("Location")
    if not location:
        raise ReferenceUnavailable("redirect without a Location", reason="http_status")
    try:
        return url.join(location)
    except httpx.InvalidURL as exc:
        raise ReferenceUnavailable("redirect to a malformed URI", reason="bad_uri") from exc


def _check_status(status: int, url: httpx.URL) -> None:
    if status == 200:
        return
    shown = redact_uri(str(url))
    if status in _NOT_FOUND_STATUSES:
        raise ReferenceUnavailable(f"{shown} was not found (HTTP {status})", reason="not_found")
    raise ReferenceUnavailable(
        f"{shown} answered HTTP {status}",
        reason="http_status",
        transient=status >= 500 or status in _TRANSIENT_STATUSES,
    )


def _check_size(size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise ReferenceInvalid(f"reference is larger than {max_bytes} bytes", reason="too_large")


def _read_regular_file(path: Path, max_bytes: int) -> bytes:
    # O_NONBLOCK: opening a FIFO planted under the root must not hang the worker.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ReferenceUnavailable("reference is not a regular file", reason="forbidden")
        _check_size(info.st_size, max_bytes)
        with os.fdopen(fd, "rb", closefd=False) as file:
            data = file.read(max_bytes + 1)
    finally:
        os.close(fd)
    _check_size(len(data), max_bytes)
    return data


def _vet_audio(data: bytes, expected_sha256: str | None, max_seconds: float) -> ReferenceAudio:
    """Checks the checksum and that the bytes decode as audio short enough. Blocking."""
    digest = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and not hmac.compare_digest(digest, expected_sha256):
        raise ReferenceInvalid(
            f"reference sha256 is {digest}, expected {expected_sha256}",
            reason="checksum_mismatch",
        )
    try:
        with sf.SoundFile(io.BytesIO(data)) as audio:
            frames = _count_frames(audio, max_seconds)
            sample_rate, channels, audio_format = audio.samplerate, audio.channels, audio.format
    except (sf.SoundFileError, RuntimeError, ValueError, TypeError) as exc:
        raise ReferenceInvalid("reference is not decodable audio", reason="not_audio") from exc
    if frames == 0:
        raise ReferenceInvalid("reference audio has no samples", reason="not_audio")
    return ReferenceAudio(
        data=data,
        sha256=digest,
        duration_seconds=frames / sample_rate,
        sample_rate=sample_rate,
        channels=channels,
        format=audio_format,
    )


def _count_frames(audio: sf.SoundFile, max_seconds: float) -> int:
    """Decodes block by block, so a corrupt file fails and memory stays bounded, and stops as
    soon as the audio is too long (compressed audio can hold hours in a few megabytes)."""
    if audio.samplerate <= 0 or audio.channels <= 0:
        raise ValueError("no sample rate or channels")
    limit = math.floor(max_seconds * audio.samplerate)
    too_long = ReferenceInvalid(
        f"reference audio is longer than {max_seconds:g}s", reason="too_long"
    )
    if audio.frames > limit:  # the header already says so
        raise too_long
    block = max(1, _DECODE_BLOCK_SAMPLES // audio.channels)
    frames = 0
    while decoded := len(audio.read(block, dtype="float32")):
        frames += decoded
        if frames > limit:
            raise too_long
    return frames
