"""SSRF end to end: requests whose reference URI points inside the network get clone-failed
REFERENCE_AUDIO_UNAVAILABLE, and no connection is ever made to what they point at.

The worker runs (on Kafka in memory) with the production default
`allow_private_networks=False`. Its reference fetcher is the real one; only its way out is
replaced (`SimulatedNetwork`): a simulated public host answers from a table, loopback goes to
the real network, where two listeners (127.0.0.1 and ::1) serve valid audio and count every
connection, so a guard that let a URI through would both succeed and be counted; any other
address is refused without leaving the machine. Name resolution is the system's, limited to
numeric forms and `localhost`, plus a few made-up names (`LocalDns`): no DNS query leaves the
machine either.

Unit-level coverage of each rule is in test_reference.py; this proves the worker applies them.
"""

import asyncio
import contextlib
import functools
import ipaddress
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

import consumer.app
from consumer.backends import BackendSettings
from consumer.reference import ReferenceFetcher, ReferenceSettings
from consumer.settings import WorkerSettings
from schemas.events import AudioReady, CloneFailed, ErrorCode
from tests.fixtures.memory_kafka import MemoryKafka
from tests.fixtures.seed import SeedServer
from tests.fixtures.worker import (
    Outcomes,
    Requests,
    WorkerSettingsFactory,
    clone_request,
    running_worker,
)

pytestmark = pytest.mark.timeout(120)

PUBLIC_IP = "93.184.215.14"  # simulated by SimulatedNetwork: never contacted
METADATA_URL = "http://169.254.169.254/latest/meta-data/iam/security-credentials/"
Answer = Callable[[httpx.Request], httpx.Response]


class Listener:
    """A TCP server on one loopback address that counts the connections it accepts and answers
    each with a valid WAV over HTTP, so a reference that got through would succeed."""

    def __init__(self, host: str, wav: bytes) -> None:
        self.host = host
        self.connections = 0
        self._response = (
            b"HTTP/1.1 200 OK\r\nContent-Type: audio/wav\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(wav), wav)
        )
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    def url(self, path: str = "/voice.wav", host: str | None = None) -> str:
        shown = host or (f"[{self.host}]" if ":" in self.host else self.host)
        return f"http://{shown}:{self.port}{path}"

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator["Listener"]:
        self._server = await asyncio.start_server(self._answer, self.host, 0)
        async with self._server:
            yield self

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(self._response)
            await writer.drain()
        writer.close()


class SimulatedNetwork(httpx.AsyncBaseTransport):
    """The fetcher's only way out. `public` answers for simulated public (address, port)s;
    loopback and unspecified addresses reach the real local network; anything else is
    recorded in `refused` and fails as a connection error, never leaving the machine."""

    def __init__(self, public: dict[tuple[str, int], Answer]) -> None:
        self.public = public
        self.sent: list[httpx.URL] = []
        self.refused: list[httpx.URL] = []
        self._local = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        self.sent.append(url)
        port = url.port or (443 if url.scheme == "https" else 80)
        answer = self.public.get((url.host, port))
        if answer is not None:
            return answer(request)
        address = ipaddress.ip_address(url.host)  # the fetcher dials addresses, not names
        if address.is_loopback or address.is_unspecified:
            return await self._local.handle_async_request(request)
        self.refused.append(url)
        raise httpx.ConnectError("the test network reaches no other host", request=request)

    async def aclose(self) -> None:
        await self._local.aclose()


class LocalDns:
    """getaddrinfo for the process: made-up `names`, `localhost` and numeric hosts as the
    system resolves them (no query leaves the machine); any other name does not exist."""

    def __init__(self, names: dict[str, list[str]]) -> None:
        self.names = names
        self._system = socket.getaddrinfo

    def __call__(
        self, host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0
    ) -> list[Any]:
        if isinstance(host, str) and host in self.names:
            return [_address_info(address, port) for address in self.names[host]]
        if host != "localhost":
            flags |= socket.AI_NUMERICHOST
        return self._system(host, port, family, type, proto, flags)


def _address_info(address: str, port: Any) -> tuple[Any, ...]:
    number = int(port or 0)
    if ipaddress.ip_address(address).version == 6:
        return (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, number, 0, 0))
    return (socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, number))


def simulated_public_host(wav: bytes, redirects: dict[str, str]) -> Answer:
    """PUBLIC_IP's web server: WAV at /voice.wav, the given redirects, 404 elsewhere."""

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/voice.wav":
            return httpx.Response(200, content=wav)
        if request.url.path in redirects:
            return httpx.Response(302, headers={"Location": redirects[request.url.path]})
        return httpx.Response(404)

    return answer


@pytest.fixture
async def loopback(reference_wav: bytes) -> AsyncIterator[tuple[Listener, Listener]]:
    async with (
        Listener("127.0.0.1", reference_wav).serving() as v4,
        Listener("::1", reference_wav).serving() as v6,
    ):
        yield v4, v6


@pytest.fixture
def outside_root(tmp_path: Path, reference_root: Path, reference_wav: bytes) -> Path:
    """Valid audio just outside the reference root, and a symlink to it inside."""
    secret = tmp_path / "secret.wav"
    secret.write_bytes(reference_wav)
    (reference_root / "escape.wav").symlink_to(secret)
    return secret


async def test_the_listeners_would_see_and_serve_a_connection_that_got_through(
    loopback: tuple[Listener, Listener], reference_wav: bytes
) -> None:
    """The harness itself, so that zero connections below means something."""
    async with httpx.AsyncClient(trust_env=False) as client:
        bodies = [(await client.get(listener.url())).content for listener in loopback]

    assert bodies == [reference_wav, reference_wav]
    assert [listener.connections for listener in loopback] == [1, 1]


@pytest.fixture
def worker_settings(
    make_memory_settings: WorkerSettingsFactory,
    seed_server: SeedServer,
    reference_root: Path,
) -> WorkerSettings:
    """The http backend on the seed server; references as in production (no private
    networks), with plain http and file:// allowed so that more URIs reach the checks."""
    return make_memory_settings(
        backend=BackendSettings(kind="http", http={"base_url": seed_server.url}),
        reference=ReferenceSettings(
            allowed_schemes=["http", "https", "file"], file_root=reference_root
        ),
    )


def internal_uris(v4: Listener, v6: Listener, root: Path) -> dict[str, str]:
    """Every way of pointing a reference inside, by name. Loopback ones name a listener."""
    return {
        "metadata": METADATA_URL,
        "loopback": v4.url(),
        "loopback-v6": v6.url(),
        "private-10": "http://10.0.0.1/voice.wav",
        "private-192": "http://192.168.1.1/voice.wav",
        "private-172": "http://172.16.0.1/voice.wav",
        "unique-local-v6": "http://[fc00::1]/voice.wav",
        "localhost": v4.url(host="localhost"),
        "name-for-loopback": v4.url(host="loopback.test"),
        "name-for-private": "http://private.test/voice.wav",
        "name-also-for-loopback": v4.url(host="mixed.test"),
        "ipv4-mapped": v4.url(host="[::ffff:127.0.0.1]"),
        "ipv4-mapped-metadata": "http://[::ffff:169.254.169.254]/latest/meta-data/",
        "nat64-loopback": v4.url(host="[64:ff9b::7f00:1]"),
        "decimal": v4.url(host="2130706433"),
        "hexadecimal": v4.url(host="0x7f000001"),
        "short": v4.url(host="127.1"),
        "octal": v4.url(host="0177.0.0.1"),
        "unspecified": v4.url(host="0.0.0.0"),
        "unspecified-v6": v6.url(host="[::]"),
        "over-long-label": f"http://{'a' * 64}.test/voice.wav",
        "port-out-of-range": f"http://{PUBLIC_IP}:99999/voice.wav",
        "file-dot-dot": f"file://{root}/../secret.wav",
        "file-symlink-out": f"file://{root}/escape.wav",
        "file-localhost-outside": "file://localhost/etc/hostname",
        **{f"redirect-{name}": f"http://{PUBLIC_IP}/{name}" for name in REDIRECTS},
        "https-name-redirect-loopback": "https://voices.test/loopback",
    }


# The simulated public host's redirects, by path; {v4}/{v6}: the listeners, {root}: the root.
REDIRECTS = {
    "loopback": "http://127.0.0.1:{v4}/voice.wav",
    "loopback-v6": "http://[::1]:{v6}/voice.wav",
    "localhost": "http://localhost:{v4}/voice.wav",
    "name-for-loopback": "http://loopback.test:{v4}/voice.wav",
    "metadata": METADATA_URL,
    "relative-to-loopback": "//127.0.0.1:{v4}/voice.wav",
    "file-inside-root": "file://{root}/voice.wav",
}


def simulated_network(wav: bytes, v4: Listener, v6: Listener, root: Path) -> SimulatedNetwork:
    redirects = {
        f"/{name}": target.format(v4=v4.port, v6=v6.port, root=root)
        for name, target in REDIRECTS.items()
    }
    public = simulated_public_host(wav, redirects)
    return SimulatedNetwork({(PUBLIC_IP, 80): public, (PUBLIC_IP, 443): public})


async def test_references_pointing_inside_fail_without_a_connection(
    worker_settings: WorkerSettings,
    memory_kafka: MemoryKafka,
    loopback: tuple[Listener, Listener],
    reference_root: Path,
    outside_root: Path,
    reference_wav: bytes,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    v4, v6 = loopback
    network = simulated_network(reference_wav, v4, v6, reference_root)
    monkeypatch.setattr(
        consumer.app, "ReferenceFetcher", functools.partial(ReferenceFetcher, transport=network)
    )
    monkeypatch.setattr(
        socket,
        "getaddrinfo",
        LocalDns(
            {
                "loopback.test": ["127.0.0.1"],
                "private.test": ["10.1.2.3"],
                "mixed.test": [PUBLIC_IP, "127.0.0.1"],
                "voices.test": [PUBLIC_IP],
            }
        ),
    )
    internal = {
        name: clone_request(uri) for name, uri in internal_uris(v4, v6, reference_root).items()
    }
    # The same routes lead to audio when they stay public: the harness lets traffic through.
    public = {
        "public-ip": clone_request(f"http://{PUBLIC_IP}/voice.wav"),
        "public-name-over-https": clone_request("https://voices.test/voice.wav"),
    }
    requests_by_name = internal | public

    async with (
        Requests(worker_settings, memory_kafka) as requests,
        Outcomes(worker_settings, memory_kafka) as outcomes,
        running_worker(worker_settings, memory_kafka),
    ):
        await requests.send(*requests_by_name.values())
        await outcomes.wait_for(r.request_id for r in requests_by_name.values())

    found = {name: outcomes.first(r.request_id) for name, r in requests_by_name.items()}
    wrong = {
        name: _summary(outcome)
        for name, outcome in found.items()
        if name in internal and _summary(outcome) != UNAVAILABLE
    }
    assert wrong == {}
    assert {name: _summary(found[name]) for name in public} == dict.fromkeys(public, "audio")
    assert [listener.connections for listener in loopback] == [0, 0]
    assert network.refused == []
    assert {url.host for url in network.sent} == {PUBLIC_IP}
    # The addresses a name resolves to stay out of the event: they would map the network.
    messages = [
        outcome.message
        for name, outcome in found.items()
        if name in ("name-for-private", "name-also-for-loopback")
        and isinstance(outcome, CloneFailed)
    ]
    assert len(messages) == 2
    assert [m for m in messages if "10.1.2.3" in m or "127.0.0.1" in m] == []


UNAVAILABLE = (ErrorCode.REFERENCE_AUDIO_UNAVAILABLE, False)


def _summary(outcome: AudioReady | CloneFailed) -> object:
    if isinstance(outcome, AudioReady):
        return "audio"
    return (outcome.error_code, outcome.retryable)
