"""The http backend against a real HTTP server speaking the seed's `/clone` contract."""

import asyncio
import base64
import binascii
import io
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import soundfile
from aiohttp import web

from consumer.backends import (
    BackendSettings,
    BackendTimeout,
    BackendUnavailable,
    ErrorCode,
    GenerationFailed,
    GenerationParams,
    InvalidInput,
)
from consumer.backends.http import HttpBackend
from tests.consumer.backends.conftest import CloneJobFactory, make_wav

SUPPORTED = [
    "Auto", "Chinese", "English", "Japanese", "Korean", "German",
    "French", "Russian", "Portuguese", "Spanish", "Italian",
]  # fmt: skip
SECONDS_PER_CHARACTER = 0.05
TOKENS_PER_SECOND = 12  # the 12 Hz codec: max_new_tokens bounds the audio's length


def _reject(detail: str, status: int = 400) -> web.Response:
    return web.json_response({"detail": detail}, status=status)


@dataclass
class SeedServer:
    """The seed's HTTP contract, with knobs for the failures a test needs."""

    url: str = ""
    delay_seconds: float = 0.0
    respond_with: tuple[int, dict[str, Any]] | None = None
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)

    async def clone(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append((request.path, body))
        self.entered.set()
        try:
            await asyncio.sleep(self.delay_seconds)
        except asyncio.CancelledError:  # aiohttp cancels the handler when the client goes away
            self.disconnected.set()
            raise
        if self.respond_with is not None:
            status, payload = self.respond_with
            return web.json_response(payload, status=status)
        return self._generate(body)

    def _generate(self, body: dict[str, Any]) -> web.Response:
        rejection = _validate(body)
        if rejection is not None:
            return _reject(rejection)
        seconds = len(body["text"]) * SECONDS_PER_CHARACTER
        seconds = min(seconds, body.get("max_new_tokens", 2048) / TOKENS_PER_SECOND)
        return web.Response(
            body=make_wav(seconds),
            content_type="audio/wav",
            headers={"Content-Disposition": "attachment; filename=output.wav"},
        )

    async def health(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "healthy", "supported_languages": SUPPORTED})


def _validate(body: dict[str, Any]) -> str | None:
    """The seed's checks, in its order; the rejection's detail or None."""
    if not body.get("text"):
        return "'text' is required"
    if not body.get("ref_text"):
        return "'ref_text' is required"
    if not (body.get("ref_audio_base64") or body.get("ref_audio_url")):
        return "'ref_audio_url' or 'ref_audio_base64' is required"
    language = body.get("language", "Auto")
    if language not in SUPPORTED:
        return f"Unsupported language: {language}. Supported: {', '.join(SUPPORTED)}"
    try:
        soundfile.info(io.BytesIO(base64.b64decode(body["ref_audio_base64"], validate=True)))
    except (binascii.Error, soundfile.SoundFileError):
        return "Could not read the reference audio"
    return None


@pytest.fixture
async def seed_server() -> AsyncIterator[SeedServer]:
    server = SeedServer()
    app = web.Application()
    app.router.add_post("/clone", server.clone)
    app.router.add_post("/small/clone", server.clone)  # a second deployment, by path
    app.router.add_get("/health", server.health)
    app.router.add_get("/small/health", server.health)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    server.url = f"http://127.0.0.1:{port}"
    yield server
    await runner.cleanup()


def _closed_port() -> int:
    """A local port nothing listens on: connecting to it is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def _started(base_url: str, **http: Any) -> HttpBackend:
    settings = BackendSettings(kind="http", http={"base_url": base_url, **http})
    backend = HttpBackend(settings)
    await backend.start()
    return backend


@pytest.fixture
async def backend(seed_server: SeedServer) -> AsyncIterator[HttpBackend]:
    backend = await _started(seed_server.url, base_url_0_6b=f"{seed_server.url}/small")
    yield backend
    await backend.close()


async def test_clone_returns_the_wav_with_facts_read_from_it(
    backend: HttpBackend, seed_server: SeedServer, clone_job: CloneJobFactory
) -> None:
    job = clone_job(text="x" * 60)

    result = await backend.clone(job, timeout=10)

    assert result.format == "WAV"
    assert result.sample_rate == 24_000
    assert result.duration_seconds == pytest.approx(60 * SECONDS_PER_CHARACTER, abs=1e-3)
    assert soundfile.info(io.BytesIO(result.audio)).frames == round(3.0 * 24_000)
    assert (result.cold_start, result.container_id, result.inference_seconds) == (None,) * 3
    path, body = seed_server.requests[0]
    assert path == "/clone"
    assert base64.b64decode(body["ref_audio_base64"]) == job.reference_audio
    assert body["ref_text"] == job.reference_text
    assert "max_new_tokens" not in body  # the seed's own default applies


async def test_max_new_tokens_is_passed_on(
    backend: HttpBackend, seed_server: SeedServer, clone_job: CloneJobFactory
) -> None:
    job = clone_job(text="x" * 600, generation=GenerationParams(max_new_tokens=24))

    result = await backend.clone(job, timeout=10)

    assert seed_server.requests[0][1]["max_new_tokens"] == 24
    assert result.duration_seconds == pytest.approx(24 / TOKENS_PER_SECOND, abs=1e-3)


async def test_model_size_selects_its_base_url(
    backend: HttpBackend, seed_server: SeedServer, clone_job: CloneJobFactory
) -> None:
    await backend.clone(clone_job(model="0.6B"), timeout=10)

    assert seed_server.requests[0][0] == "/small/clone"


async def test_unknown_model_size_is_invalid_input(
    backend: HttpBackend, seed_server: SeedServer, clone_job: CloneJobFactory
) -> None:
    with pytest.raises(InvalidInput, match="'3B' is not served"):
        await backend.clone(clone_job(model="3B"), timeout=10)

    assert seed_server.requests == []


async def test_xvector_only_job_is_refused_before_sending(
    backend: HttpBackend, seed_server: SeedServer, clone_job: CloneJobFactory
) -> None:
    with pytest.raises(InvalidInput, match="x-vector") as raised:
        await backend.clone(clone_job(reference_text=None), timeout=10)

    assert raised.value.code == ErrorCode.INVALID_REQUEST
    assert not raised.value.transient
    assert seed_server.requests == []


async def test_unsupported_language_is_permanent_with_its_code(
    backend: HttpBackend, clone_job: CloneJobFactory
) -> None:
    with pytest.raises(InvalidInput, match="Unsupported language: Klingon") as raised:
        await backend.clone(clone_job(language="Klingon"), timeout=10)

    assert raised.value.code == ErrorCode.UNSUPPORTED_LANGUAGE
    assert not raised.value.transient


async def test_other_rejections_are_invalid_request(
    backend: HttpBackend, clone_job: CloneJobFactory
) -> None:
    with pytest.raises(InvalidInput, match="reference audio") as raised:
        await backend.clone(clone_job(reference_audio=b"not audio at all"), timeout=10)

    assert raised.value.code == ErrorCode.INVALID_REQUEST


async def test_generation_failure_is_permanent_inference_failed(
    backend: HttpBackend, seed_server: SeedServer, clone_job: CloneJobFactory
) -> None:
    seed_server.respond_with = (500, {"detail": "Generation failed: CUDA out of memory"})

    with pytest.raises(GenerationFailed, match="CUDA out of memory") as raised:
        await backend.clone(clone_job(), timeout=10)

    assert raised.value.code == ErrorCode.INFERENCE_FAILED
    assert not raised.value.transient


@pytest.mark.parametrize("status", [429, 502, 503, 504])
async def test_overload_and_gateway_errors_are_transient(
    backend: HttpBackend, seed_server: SeedServer, clone_job: CloneJobFactory, status: int
) -> None:
    seed_server.respond_with = (status, {"detail": "try later"})

    with pytest.raises(BackendUnavailable, match=str(status)) as raised:
        await backend.clone(clone_job(), timeout=10)

    assert raised.value.transient
    assert raised.value.code == ErrorCode.INFERENCE_FAILED


async def test_wrong_endpoint_is_permanent(
    seed_server: SeedServer, clone_job: CloneJobFactory
) -> None:
    backend = await _started(f"{seed_server.url}/nowhere")
    try:
        with pytest.raises(BackendUnavailable, match="404") as raised:
            await backend.clone(clone_job(), timeout=10)
    finally:
        await backend.close()

    assert not raised.value.transient


async def test_success_that_is_not_audio_is_generation_failed(
    backend: HttpBackend, seed_server: SeedServer, clone_job: CloneJobFactory
) -> None:
    seed_server.respond_with = (200, {"status": "ok"})

    with pytest.raises(GenerationFailed, match="not audio"):
        await backend.clone(clone_job(), timeout=10)


async def test_connection_refused_is_transient(clone_job: CloneJobFactory) -> None:
    backend = await _started(f"http://127.0.0.1:{_closed_port()}")
    try:
        with pytest.raises(BackendUnavailable, match="ConnectError") as raised:
            await backend.clone(clone_job(), timeout=10)
    finally:
        await backend.close()

    assert raised.value.transient


async def test_slow_server_times_out_within_the_budget(
    backend: HttpBackend, seed_server: SeedServer, clone_job: CloneJobFactory
) -> None:
    seed_server.delay_seconds = 30
    started = time.monotonic()

    with pytest.raises(BackendTimeout) as raised:
        await backend.clone(clone_job(), timeout=0.3)

    assert 0.25 <= time.monotonic() - started < 1.0
    assert raised.value.transient
    assert raised.value.code == ErrorCode.INFERENCE_TIMEOUT
    await asyncio.wait_for(seed_server.disconnected.wait(), timeout=2)


async def test_configured_limit_caps_the_callers_timeout(
    seed_server: SeedServer, clone_job: CloneJobFactory
) -> None:
    seed_server.delay_seconds = 30
    backend = HttpBackend(
        BackendSettings(kind="http", timeout_seconds=0.3, http={"base_url": seed_server.url})
    )
    await backend.start()
    started = time.monotonic()
    try:
        with pytest.raises(BackendTimeout):
            await backend.clone(clone_job(), timeout=None)
    finally:
        await backend.close()

    assert time.monotonic() - started < 1.0


async def test_expired_deadline_sends_nothing(
    backend: HttpBackend, seed_server: SeedServer, clone_job: CloneJobFactory
) -> None:
    with pytest.raises(BackendTimeout):
        await backend.clone(clone_job(), timeout=0)

    assert seed_server.requests == []


async def test_cancelling_a_call_closes_its_connection(
    backend: HttpBackend, seed_server: SeedServer, clone_job: CloneJobFactory
) -> None:
    seed_server.delay_seconds = 30
    call = asyncio.create_task(backend.clone(clone_job(), timeout=60))
    await asyncio.wait_for(seed_server.entered.wait(), timeout=5)

    call.cancel()

    with pytest.raises(asyncio.CancelledError):
        await call
    await asyncio.wait_for(seed_server.disconnected.wait(), timeout=2)


async def test_ready_follows_health(backend: HttpBackend) -> None:
    assert await backend.ready()

    down = await _started(f"http://127.0.0.1:{_closed_port()}")
    try:
        assert not await down.ready()
    finally:
        await down.close()
