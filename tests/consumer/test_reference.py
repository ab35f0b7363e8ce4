"""Reference audio fetching: a real loopback HTTP server for the network paths, real WAV bytes,
and a recording mock transport where the point is that no request is ever sent."""

import asyncio
import functools
import hashlib
import io
import ipaddress
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile as sf
from pydantic import ValidationError

import consumer.reference as reference
from consumer.reference import (
    ObjectReader,
    ReferenceFetcher,
    ReferenceInvalid,
    ReferenceSettings,
    ReferenceUnavailable,
    is_public_address,
)

PUBLIC_IP = "93.184.215.14"


@functools.cache
def wav_bytes(seconds: float = 1.0, rate: int = 16_000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    buffer = io.BytesIO()
    sf.write(buffer, 0.3 * np.sin(2 * np.pi * 220 * t), rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# The loopback server


@dataclass
class Route:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_length: bool = True  # False: HTTP/1.0 body delimited by closing the connection
    delay: float = 0.0


class LoopbackServer:
    """An HTTP server on 127.0.0.1 that records every path it is asked for."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.hits: Counter[str] = Counter()
        self.host_headers: list[str] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                server.hits[path] += 1
                server.host_headers.append(self.headers.get("Host", ""))
                route = server.routes.get(path, Route(status=404))
                time.sleep(route.delay)
                try:
                    self.send_response(route.status)
                    for name, value in route.headers.items():
                        self.send_header(name, value)
                    if route.content_length:
                        self.send_header("Content-Length", str(len(route.body)))
                    self.end_headers()
                    self.wfile.write(route.body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up on purpose (size cap, timeout)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


@pytest.fixture
def server() -> Iterator[LoopbackServer]:
    loopback = LoopbackServer()
    loopback.routes["/voice.wav"] = Route(body=wav_bytes())
    yield loopback
    loopback.close()


class Recorder:
    """A mock transport that records requests; answers with ``respond``."""

    def __init__(self, respond: Callable[[httpx.Request], httpx.Response] | None = None) -> None:
        self.requests: list[httpx.Request] = []
        self._respond = respond or (lambda request: httpx.Response(200, content=wav_bytes()))
        self.transport = httpx.MockTransport(self._handle)

    def _handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self._respond(request)


MakeFetcher = Callable[..., ReferenceFetcher]


@pytest.fixture
async def make_fetcher() -> AsyncIterator[MakeFetcher]:
    """Fetchers for the loopback server: http allowed, private networks allowed, unless the
    test says otherwise."""
    fetchers: list[ReferenceFetcher] = []

    def make(
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        object_reader: ObjectReader | None = None,
        clock: Callable[[], float] = time.monotonic,
        **options: Any,
    ) -> ReferenceFetcher:
        settings = ReferenceSettings(
            **({"allowed_schemes": ["http"], "allow_private_networks": True} | options)
        )
        fetcher = ReferenceFetcher(
            settings, transport=transport, object_reader=object_reader, clock=clock
        )
        fetchers.append(fetcher)
        return fetcher

    yield make
    for fetcher in fetchers:
        await fetcher.close()


def resolve_to(mapping: dict[str, list[str]]) -> Callable[..., Any]:
    """A stand-in for DNS."""

    async def resolve(host: str, port: int) -> list[reference.IPAddress]:
        return [ipaddress.ip_address(address) for address in mapping[host]]

    return resolve


# Fetching over HTTP


async def test_fetches_and_measures_audio(
    server: LoopbackServer, make_fetcher: MakeFetcher
) -> None:
    audio = await make_fetcher().fetch(server.url("/voice.wav"))

    assert audio.data == wav_bytes()
    assert audio.sha256 == sha256(wav_bytes())
    assert audio.duration_seconds == pytest.approx(1.0)
    assert (audio.sample_rate, audio.channels, audio.format) == (16_000, 1, "WAV")
    samples, rate = audio.decode()
    assert rate == 16_000
    assert samples.shape == (16_000,)
    assert "data=" not in repr(audio)  # megabytes of bytes stay out of logs


async def test_matching_checksum_is_accepted_in_any_case(
    server: LoopbackServer, make_fetcher: MakeFetcher
) -> None:
    audio = await make_fetcher().fetch(server.url("/voice.wav"), sha256(wav_bytes()).upper())

    assert audio.sha256 == sha256(wav_bytes())


async def test_checksum_mismatch_is_invalid(
    server: LoopbackServer, make_fetcher: MakeFetcher
) -> None:
    with pytest.raises(ReferenceInvalid) as caught:
        await make_fetcher().fetch(server.url("/voice.wav"), "0" * 64)

    assert caught.value.reason == "checksum_mismatch"
    assert caught.value.transient is False


async def test_malformed_checksum_is_invalid_without_fetching(
    server: LoopbackServer, make_fetcher: MakeFetcher
) -> None:
    with pytest.raises(ReferenceInvalid) as caught:
        await make_fetcher().fetch(server.url("/voice.wav"), "not-a-digest")

    assert caught.value.reason == "bad_checksum"
    assert server.hits == Counter()


@pytest.mark.parametrize("body", [b"RIFF but not really audio" * 50, b""])
async def test_non_audio_is_invalid(
    server: LoopbackServer, make_fetcher: MakeFetcher, body: bytes
) -> None:
    server.routes["/notes.txt"] = Route(body=body)

    with pytest.raises(ReferenceInvalid) as caught:
        await make_fetcher().fetch(server.url("/notes.txt"))

    assert caught.value.reason == "not_audio"


async def test_too_long_audio_is_invalid(server: LoopbackServer, make_fetcher: MakeFetcher) -> None:
    with pytest.raises(ReferenceInvalid) as caught:
        await make_fetcher(max_duration_seconds=0.5).fetch(server.url("/voice.wav"))

    assert caught.value.reason == "too_long"


async def test_declared_length_over_the_cap_is_refused(
    server: LoopbackServer, make_fetcher: MakeFetcher
) -> None:
    with pytest.raises(ReferenceInvalid) as caught:
        await make_fetcher(max_bytes=len(wav_bytes()) - 1).fetch(server.url("/voice.wav"))

    assert caught.value.reason == "too_large"


async def test_undeclared_length_is_capped_while_streaming(
    server: LoopbackServer, make_fetcher: MakeFetcher
) -> None:
    server.routes["/big"] = Route(body=b"\0" * 200_000, content_length=False)
    server.routes["/small.wav"] = Route(body=wav_bytes(), content_length=False)
    fetcher = make_fetcher(max_bytes=100_000)

    with pytest.raises(ReferenceInvalid) as caught:
        await fetcher.fetch(server.url("/big"))
    assert caught.value.reason == "too_large"
    assert (await fetcher.fetch(server.url("/small.wav"))).data == wav_bytes()


@pytest.mark.parametrize(
    ("status", "reason", "transient"),
    [
        (404, "not_found", False),
        (410, "not_found", False),
        (403, "http_status", False),
        (429, "http_status", True),
        (500, "http_status", True),
        (503, "http_status", True),
    ],
)
async def test_http_status_decides_transience(
    server: LoopbackServer, make_fetcher: MakeFetcher, status: int, reason: str, transient: bool
) -> None:
    server.routes["/x.wav"] = Route(status=status)

    with pytest.raises(ReferenceUnavailable) as caught:
        await make_fetcher().fetch(server.url("/x.wav"))

    assert (caught.value.reason, caught.value.transient) == (reason, transient)


async def test_slow_server_times_out_transiently(
    server: LoopbackServer, make_fetcher: MakeFetcher
) -> None:
    server.routes["/slow.wav"] = Route(body=wav_bytes(), delay=2.0)
    started = time.monotonic()

    with pytest.raises(ReferenceUnavailable) as caught:
        await make_fetcher(timeout_seconds=0.2).fetch(server.url("/slow.wav"))

    assert (caught.value.reason, caught.value.transient) == ("timeout", True)
    assert time.monotonic() - started < 1.5


async def test_refused_connection_is_transient(make_fetcher: MakeFetcher) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens once it is closed

    with pytest.raises(ReferenceUnavailable) as caught:
        await make_fetcher().fetch(f"http://127.0.0.1:{port}/voice.wav")

    assert (caught.value.reason, caught.value.transient) == ("network", True)


async def test_messages_leave_out_query_strings_and_credentials(
    server: LoopbackServer, make_fetcher: MakeFetcher
) -> None:
    with pytest.raises(ReferenceUnavailable) as caught:
        await make_fetcher().fetch(server.url("/gone.wav?X-Amz-Signature=topsecret"))

    assert "topsecret" not in str(caught.value)
    assert "/gone.wav" in str(caught.value)


async def test_huge_uris_are_refused_with_a_short_message(make_fetcher: MakeFetcher) -> None:
    with pytest.raises(ReferenceUnavailable) as caught:
        await make_fetcher().fetch("http://example.com/" + "a" * 100_000)

    assert caught.value.reason == "bad_uri"
    assert len(str(caught.value)) < 200


# Redirects


async def test_redirects_are_followed(server: LoopbackServer, make_fetcher: MakeFetcher) -> None:
    server.routes["/hop"] = Route(status=302, headers={"Location": "/voice.wav"})

    audio = await make_fetcher().fetch(server.url("/hop"))

    assert audio.data == wav_bytes()
    assert server.hits == Counter({"/hop": 1, "/voice.wav": 1})


async def test_redirect_chains_are_bounded(
    server: LoopbackServer, make_fetcher: MakeFetcher
) -> None:
    server.routes["/loop"] = Route(status=307, headers={"Location": "/loop"})

    with pytest.raises(ReferenceUnavailable) as caught:
        await make_fetcher(max_redirects=3).fetch(server.url("/loop"))

    assert caught.value.reason == "too_many_redirects"
    assert server.hits["/loop"] == 4


async def test_redirect_to_a_disallowed_host_is_not_followed(
    server: LoopbackServer, make_fetcher: MakeFetcher
) -> None:
    server.routes["/hop"] = Route(
        status=302, headers={"Location": server.url("/voice.wav", host="localhost")}
    )

    with pytest.raises(ReferenceUnavailable) as caught:
        await make_fetcher(allowed_hosts=["127.0.0.1"]).fetch(server.url("/hop"))

    assert caught.value.reason == "forbidden"
    assert server.hits == Counter({"/hop": 1})


@pytest.mark.parametrize(
    "target", ["http://127.0.0.1:{port}/voice.wav", "http://169.254.169.254/latest/meta-data/"]
)
async def test_redirect_from_a_public_host_to_an_internal_one_is_refused(
    server: LoopbackServer, make_fetcher: MakeFetcher, target: str
) -> None:
    location = target.format(port=server.port)
    recorder = Recorder(lambda request: httpx.Response(302, headers={"Location": location}))
    fetcher = make_fetcher(transport=recorder.transport, allow_private_networks=False)

    with pytest.raises(ReferenceUnavailable) as caught:
        await fetcher.fetch(f"http://{PUBLIC_IP}/voice.wav")

    assert caught.value.reason == "blocked_address"
    assert [str(request.url) for request in recorder.requests] == [f"http://{PUBLIC_IP}/voice.wav"]
    assert server.hits == Counter()


async def test_redirect_to_another_scheme_is_refused(make_fetcher: MakeFetcher) -> None:
    recorder = Recorder(
        lambda request: httpx.Response(302, headers={"Location": "file:///etc/passwd"})
    )
    fetcher = make_fetcher(
        transport=recorder.transport,
        allowed_schemes=["http", "file"],
        file_root="/",
        allow_private_networks=False,
    )

    with pytest.raises(ReferenceUnavailable) as caught:
        await fetcher.fetch(f"http://{PUBLIC_IP}/voice.wav")

    assert caught.value.reason == "forbidden"
    assert len(recorder.requests) == 1


# SSRF: internal addresses are refused before any connection


async def test_loopback_server_is_refused_without_a_hit(
    server: LoopbackServer, make_fetcher: MakeFetcher
) -> None:
    fetcher = make_fetcher(allow_private_networks=False)

    for host in ("127.0.0.1", "localhost"):
        with pytest.raises(ReferenceUnavailable) as caught:
            await fetcher.fetch(server.url("/voice.wav", host=host))
        assert (caught.value.reason, caught.value.transient) == ("blocked_address", False)

    assert server.hits == Counter()


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "127.1.2.3",
        "[::1]",
        "169.254.169.254",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.10",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "[fd00::1]",
        "[fe80::1]",
        "[::]",
        "[ff02::1]",
        "[::ffff:127.0.0.1]",
        "[64:ff9b::a9fe:a9fe]",  # NAT64 spelling of 169.254.169.254
        "2130706433",  # 127.0.0.1 as one decimal number, as resolvers accept it
        "localhost",
    ],
)
async def test_internal_addresses_are_refused_before_connecting(
    make_fetcher: MakeFetcher, host: str
) -> None:
    recorder = Recorder()
    fetcher = make_fetcher(transport=recorder.transport, allow_private_networks=False)

    with pytest.raises(ReferenceUnavailable) as caught:
        await fetcher.fetch(f"http://{host}/voice.wav")

    assert (caught.value.reason, caught.value.transient) == ("blocked_address", False)
    assert recorder.requests == []


async def test_a_name_with_any_internal_address_is_refused(
    make_fetcher: MakeFetcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        reference, "_resolve_host", resolve_to({"voices.example.com": [PUBLIC_IP, "10.1.2.3"]})
    )
    recorder = Recorder()
    fetcher = make_fetcher(transport=recorder.transport, allow_private_networks=False)

    with pytest.raises(ReferenceUnavailable) as caught:
        await fetcher.fetch("http://voices.example.com/voice.wav")

    assert caught.value.reason == "blocked_address"
    assert "10.1.2.3" not in str(caught.value)
    assert recorder.requests == []


async def test_connects_to_the_vetted_address_keeping_host_and_sni(
    make_fetcher: MakeFetcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reference, "_resolve_host", resolve_to({"voices.example.com": [PUBLIC_IP]}))
    recorder = Recorder()
    fetcher = make_fetcher(
        transport=recorder.transport, allowed_schemes=["https"], allow_private_networks=False
    )

    await fetcher.fetch("https://voices.example.com/voice.wav")

    (request,) = recorder.requests
    assert request.url.host == PUBLIC_IP
    assert request.headers["Host"] == "voices.example.com"
    assert request.extensions["sni_hostname"] == "voices.example.com"


async def test_a_real_connection_goes_to_the_resolved_address(
    server: LoopbackServer, make_fetcher: MakeFetcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    # voices.test exists in no DNS: the download works only if it dials the vetted address.
    monkeypatch.setattr(reference, "_resolve_host", resolve_to({"voices.test": ["127.0.0.1"]}))

    audio = await make_fetcher().fetch(server.url("/voice.wav", host="voices.test"))

    assert audio.data == wav_bytes()
    assert server.host_headers == [f"voices.test:{server.port}"]


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("a.example.com", True),
        ("deep.a.example.com", True),
        ("CDN.Voices.IO", True),
        ("example.com", False),
        ("badexample.com", False),
        ("a.example.com.evil.net", False),
        ("voices.io", False),
    ],
)
async def test_host_allowlist(
    make_fetcher: MakeFetcher, monkeypatch: pytest.MonkeyPatch, host: str, allowed: bool
) -> None:
    monkeypatch.setattr(reference, "_resolve_host", resolve_to({host.lower(): [PUBLIC_IP]}))
    recorder = Recorder()
    fetcher = make_fetcher(
        transport=recorder.transport,
        allowed_schemes=["https"],
        allowed_hosts=["*.example.com", "cdn.voices.io"],
        allow_private_networks=False,
    )

    if allowed:
        await fetcher.fetch(f"https://{host}/voice.wav")
        assert len(recorder.requests) == 1
    else:
        with pytest.raises(ReferenceUnavailable) as caught:
            await fetcher.fetch(f"https://{host}/voice.wav")
        assert caught.value.reason == "forbidden"
        assert recorder.requests == []


@pytest.mark.parametrize(
    "uri",
    [
        "http://voices.example.com/voice.wav",  # http is off by default
        "ftp://voices.example.com/voice.wav",
        "gopher://voices.example.com/",
        "file:///etc/passwd",
        "data:audio/wav;base64,UklGRg==",
        "voice.wav",
    ],
)
async def test_schemes_outside_the_default_allowlist_are_refused(
    make_fetcher: MakeFetcher, uri: str
) -> None:
    recorder = Recorder()
    fetcher = make_fetcher(
        transport=recorder.transport,
        allowed_schemes=ReferenceSettings().allowed_schemes,
        allow_private_networks=False,
    )

    with pytest.raises(ReferenceUnavailable) as caught:
        await fetcher.fetch(uri)

    assert (caught.value.reason, caught.value.transient) == ("forbidden", False)
    assert recorder.requests == []


async def test_credentials_in_the_uri_are_refused(make_fetcher: MakeFetcher) -> None:
    recorder = Recorder()
    fetcher = make_fetcher(transport=recorder.transport, allowed_schemes=["https"])

    with pytest.raises(ReferenceUnavailable) as caught:
        await fetcher.fetch(f"https://user:hunter2@{PUBLIC_IP}/voice.wav")

    assert caught.value.reason == "forbidden"
    assert "hunter2" not in str(caught.value)
    assert recorder.requests == []


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("93.184.215.14", True),
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
        ("127.0.0.1", False),
        ("169.254.169.254", False),
        ("10.255.0.1", False),
        ("172.31.255.255", False),
        ("192.168.0.1", False),
        ("192.0.2.1", False),  # documentation range
        ("240.0.0.1", False),
        ("255.255.255.255", False),
        ("::1", False),
        ("fc00::1", False),
        ("fec0::1", False),  # deprecated site-local
        ("::ffff:10.0.0.1", False),
        ("2002:7f00:1::", False),  # 6to4 wrapping 127.0.0.1
    ],
)
def test_public_address_policy(address: str, public: bool) -> None:
    assert is_public_address(ipaddress.ip_address(address)) is public


# The cache


async def test_a_cached_reference_is_downloaded_once(
    server: LoopbackServer, make_fetcher: MakeFetcher
) -> None:
    fetcher = make_fetcher()

    first = await fetcher.fetch(server.url("/voice.wav"))
    second = await fetcher.fetch(server.url("/voice.wav"))

    assert second is first
    assert server.hits["/voice.wav"] == 1
    assert fetcher.cached == 1


async def test_concurrent_fetches_share_one_download(
    server: LoopbackServer, make_fetcher: MakeFetcher
) -> None:
    server.routes["/voice.wav"].delay = 0.2
    fetcher = make_fetcher()

    first, second = await asyncio.gather(
        fetcher.fetch(server.url("/voice.wav")), fetcher.fetch(server.url("/voice.wav"))
    )

    assert first is second
    assert server.hits["/voice.wav"] == 1


async def test_one_waiter_cancelling_does_not_cancel_the_download_for_others(
    server: LoopbackServer, make_fetcher: MakeFetcher
) -> None:
    server.routes["/voice.wav"].delay = 0.2
    fetcher = make_fetcher()
    impatient = asyncio.create_task(fetcher.fetch(server.url("/voice.wav")))
    patient = asyncio.create_task(fetcher.fetch(server.url("/voice.wav")))
    await asyncio.sleep(0.05)

    impatient.cancel()

    assert (await patient).data == wav_bytes()
    assert impatient.cancelled()
    assert server.hits["/voice.wav"] == 1


async def test_failures_are_not_cached(server: LoopbackServer, make_fetcher: MakeFetcher) -> None:
    server.routes["/flaky.wav"] = Route(status=503)
    fetcher = make_fetcher()
    with pytest.raises(ReferenceUnavailable):
        await fetcher.fetch(server.url("/flaky.wav"))

    server.routes["/flaky.wav"] = Route(body=wav_bytes())
    audio = await fetcher.fetch(server.url("/flaky.wav"))

    assert audio.data == wav_bytes()
    assert server.hits["/flaky.wav"] == 2


async def test_least_recently_used_entries_are_evicted(
    server: LoopbackServer, make_fetcher: MakeFetcher
) -> None:
    server.routes["/other.wav"] = Route(body=wav_bytes(0.5))
    fetcher = make_fetcher(cache_entries=1)

    for path in ("/voice.wav", "/other.wav", "/voice.wav"):
        await fetcher.fetch(server.url(path))

    assert server.hits == Counter({"/voice.wav": 2, "/other.wav": 1})
    assert fetcher.cached == 1


async def test_cache_byte_budget_is_respected(
    server: LoopbackServer, make_fetcher: MakeFetcher
) -> None:
    fetcher = make_fetcher(cache_max_bytes=len(wav_bytes()) - 1)

    await fetcher.fetch(server.url("/voice.wav"))
    await fetcher.fetch(server.url("/voice.wav"))

    assert server.hits["/voice.wav"] == 2
    assert fetcher.cached == 0


async def test_unpinned_entries_expire_but_pinned_ones_do_not(
    server: LoopbackServer, make_fetcher: MakeFetcher
) -> None:
    now = [0.0]
    fetcher = make_fetcher(cache_ttl_seconds=60, clock=lambda: now[0])
    url, digest = server.url("/voice.wav"), sha256(wav_bytes())
    await fetcher.fetch(url)
    await fetcher.fetch(url, digest)

    now[0] = 61.0
    await fetcher.fetch(url)
    await fetcher.fetch(url, digest)

    assert server.hits["/voice.wav"] == 3  # unpinned twice, pinned once


# file://


@pytest.fixture
def voice_root(tmp_path: Path) -> Path:
    root = tmp_path / "voices"
    root.mkdir()
    (root / "alice.wav").write_bytes(wav_bytes())
    (tmp_path / "secret.wav").write_bytes(wav_bytes())
    (root / "escape.wav").symlink_to(tmp_path / "secret.wav")
    (root / "alias.wav").symlink_to(root / "alice.wav")
    return root


@pytest.fixture
def file_fetcher(make_fetcher: MakeFetcher, voice_root: Path) -> ReferenceFetcher:
    return make_fetcher(allowed_schemes=["file"], file_root=voice_root)


@pytest.mark.parametrize("name", ["alice.wav", "alias.wav", "sub/../alice.wav"])
async def test_files_inside_the_root_are_read(
    file_fetcher: ReferenceFetcher, voice_root: Path, name: str
) -> None:
    (voice_root / "sub").mkdir()

    audio = await file_fetcher.fetch(f"file://{voice_root}/{name}")

    assert audio.data == wav_bytes()


@pytest.mark.parametrize("name", ["../secret.wav", "%2e%2e/secret.wav", "escape.wav"])
async def test_files_escaping_the_root_are_refused(
    file_fetcher: ReferenceFetcher, voice_root: Path, name: str
) -> None:
    with pytest.raises(ReferenceUnavailable) as caught:
        await file_fetcher.fetch(f"file://{voice_root}/{name}")

    assert (caught.value.reason, caught.value.transient) == ("forbidden", False)


async def test_missing_file_is_not_found(file_fetcher: ReferenceFetcher, voice_root: Path) -> None:
    with pytest.raises(ReferenceUnavailable) as caught:
        await file_fetcher.fetch(f"file://{voice_root}/bob.wav")

    assert (caught.value.reason, caught.value.transient) == ("not_found", False)


async def test_special_files_are_refused_without_blocking(
    file_fetcher: ReferenceFetcher, voice_root: Path
) -> None:
    os.mkfifo(voice_root / "pipe.wav")

    for name in ("pipe.wav", ""):
        with pytest.raises(ReferenceUnavailable) as caught:
            await asyncio.wait_for(file_fetcher.fetch(f"file://{voice_root}/{name}"), 5)
        assert caught.value.reason == "forbidden"


async def test_file_size_cap(make_fetcher: MakeFetcher, voice_root: Path) -> None:
    fetcher = make_fetcher(allowed_schemes=["file"], file_root=voice_root, max_bytes=1000)

    with pytest.raises(ReferenceInvalid) as caught:
        await fetcher.fetch(f"file://{voice_root}/alice.wav")

    assert caught.value.reason == "too_large"


async def test_file_uri_naming_a_host_is_refused(file_fetcher: ReferenceFetcher) -> None:
    with pytest.raises(ReferenceUnavailable) as caught:
        await file_fetcher.fetch("file://fileserver/voices/alice.wav")

    assert caught.value.reason == "bad_uri"


# s3:// through the storage layer's reader


class StorageFailure(Exception):
    def __init__(self, transient: bool) -> None:
        super().__init__("storage said no")
        self.transient = transient


class FakeObjectReader:
    def __init__(self, objects: dict[str, bytes | Exception]) -> None:
        self.objects = objects
        self.calls: list[tuple[str, int]] = []

    async def read(self, uri: str, max_bytes: int) -> bytes:
        self.calls.append((uri, max_bytes))
        found = self.objects[uri]
        if isinstance(found, Exception):
            raise found
        return found


async def test_s3_references_are_read_through_the_object_reader(
    make_fetcher: MakeFetcher,
) -> None:
    reader = FakeObjectReader({"s3://voices/alice.wav": wav_bytes()})
    fetcher = make_fetcher(allowed_schemes=["s3"], object_reader=reader, max_bytes=1_000_000)

    audio = await fetcher.fetch("s3://voices/alice.wav", sha256(wav_bytes()))

    assert audio.data == wav_bytes()
    assert reader.calls == [("s3://voices/alice.wav", 1_000_000)]


async def test_s3_bucket_allowlist(make_fetcher: MakeFetcher) -> None:
    reader = FakeObjectReader({})
    fetcher = make_fetcher(allowed_schemes=["s3"], allowed_buckets=["voices"], object_reader=reader)

    with pytest.raises(ReferenceUnavailable) as caught:
        await fetcher.fetch("s3://billing/alice.wav")

    assert caught.value.reason == "forbidden"
    assert reader.calls == []


@pytest.mark.parametrize("transient", [True, False])
async def test_storage_errors_keep_their_transience(
    make_fetcher: MakeFetcher, transient: bool
) -> None:
    failure = StorageFailure(transient)
    reader = FakeObjectReader({"s3://voices/alice.wav": failure})
    fetcher = make_fetcher(allowed_schemes=["s3"], object_reader=reader)

    with pytest.raises(ReferenceUnavailable) as caught:
        await fetcher.fetch("s3://voices/alice.wav")

    assert (caught.value.reason, caught.value.transient) == ("storage", transient)
    assert caught.value.__cause__ is failure


async def test_storage_bugs_propagate_unchanged(make_fetcher: MakeFetcher) -> None:
    reader = FakeObjectReader({"s3://voices/alice.wav": KeyError("bug")})
    fetcher = make_fetcher(allowed_schemes=["s3"], object_reader=reader)

    with pytest.raises(KeyError):
        await fetcher.fetch("s3://voices/alice.wav")


async def test_s3_answer_over_the_cap_is_refused(make_fetcher: MakeFetcher) -> None:
    reader = FakeObjectReader({"s3://voices/alice.wav": wav_bytes()})
    fetcher = make_fetcher(allowed_schemes=["s3"], object_reader=reader, max_bytes=100)

    with pytest.raises(ReferenceInvalid) as caught:
        await fetcher.fetch("s3://voices/alice.wav")

    assert caught.value.reason == "too_large"


@pytest.mark.parametrize(
    ("uri", "reason"), [("s3://voices/x.wav", "forbidden"), ("s3://voices/", "bad_uri")]
)
async def test_s3_without_reader_or_key_is_unavailable(
    make_fetcher: MakeFetcher, uri: str, reason: str
) -> None:
    with pytest.raises(ReferenceUnavailable) as caught:
        await make_fetcher(allowed_schemes=["s3"]).fetch(uri)

    assert caught.value.reason == reason


# Settings


def test_settings_defaults_are_safe() -> None:
    settings = ReferenceSettings()

    assert settings.allowed_schemes == ["https", "s3"]
    assert settings.allow_private_networks is False
    assert settings.max_bytes == 20_000_000
    assert all(field.description for field in ReferenceSettings.model_fields.values())


@pytest.mark.parametrize(
    "options",
    [
        {"allowed_schemes": ["gopher"]},
        {"allowed_schemes": ["file"]},  # without file_root
        {"allowed_hosts": ["*"]},
        {"allowed_hosts": ["ex*ample.com"]},
        {"max_bytes": 0},
    ],
)
def test_bad_settings_are_rejected(options: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ReferenceSettings(**options)


def test_settings_normalise_schemes_and_hosts() -> None:
    settings = ReferenceSettings(allowed_schemes=["HTTPS"], allowed_hosts=["CDN.Example.com."])

    assert settings.allowed_schemes == ["https"]
    assert settings.allowed_hosts == ["cdn.example.com"]
