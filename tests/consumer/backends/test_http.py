"""The http backend against a real HTTP server speaking the seed's `/clone` contract."""

import asyncio
import base64
import io
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import soundfile

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
from tests.consumer.backends.conftest import CloneJobFactory
from tests.fixtures.seed import SECONDS_PER_CHARACTER, TOKENS_PER_SECOND, SeedServer


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


async def test_clone_returns_the_services_wav_as_sent(
    backend: HttpBackend, seed_server: SeedServer, clone_job: CloneJobFactory
) -> None:
    job = clone_job(text="x" * 60)

    result = await backend.clone(job, timeout=10)

    info = soundfile.info(io.BytesIO(result.audio))
    assert (info.format, info.samplerate) == ("WAV", 24_000)
    assert info.duration == pytest.approx(60 * SECONDS_PER_CHARACTER, abs=1e-3)
    assert info.frames == round(3.0 * 24_000)
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
    duration = soundfile.info(io.BytesIO(result.audio)).duration
    assert duration == pytest.approx(24 / TOKENS_PER_SECOND, abs=1e-3)


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
