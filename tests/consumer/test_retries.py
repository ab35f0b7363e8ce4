"""Transient failures are retried in the stage that failed, bounded; the rest fail at once.

Real parts throughout: a seed-contract HTTP service and a reference host that fail on demand,
MinIO behind a proxy that answers 503 on demand, and a running worker (on Kafka in memory) for
the clone-failed event's attempts and the dead letter's headers.
"""

import contextlib
import dataclasses
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry
from yarl import URL

from consumer.backends import BackendSettings
from consumer.backends.http import HttpBackend
from consumer.errors import CloneError
from consumer.pipeline import Pipeline
from consumer.reference import ReferenceFetcher, ReferenceSettings
from consumer.settings import LimitSettings, RetrySettings
from consumer.telemetry import Metrics
from producer.retry import RetryPolicy
from producer.storage import LocalStorage, S3Storage, Storage
from schemas.events import AudioReady, CloneFailed, CloneRequest, ErrorCode
from tests.fixtures.memory_kafka import MemoryKafka
from tests.fixtures.s3 import S3Server
from tests.fixtures.seed import SeedServer
from tests.fixtures.worker import (
    Outcomes,
    Requests,
    WorkerSettingsFactory,
    clone_request,
    running_worker,
    sha256_of,
)

pytestmark = pytest.mark.timeout(120)


class Unjittered(RetrySettings):
    """Retry settings whose waits are their nominal lengths, for timing that tests can predict."""

    def policy(self) -> RetryPolicy:
        return dataclasses.replace(super().policy(), jitter=False)


FAST = RetrySettings(max_attempts=3, initial_backoff_seconds=0.01, max_backoff_seconds=0.05)
BUSY = 503


@dataclass
class FlakyServer(SeedServer):
    """The seed's `/clone` and a reference recording at `/voice.wav`; each first answers the
    statuses queued for it, in turn, then serves."""

    reference: bytes = b""
    clone_failures: list[int] = field(default_factory=list)
    reference_failures: list[int] = field(default_factory=list)
    reference_hits: int = 0
    called_at: list[float] = field(default_factory=list)  # time.monotonic() of each call

    async def clone(self, request: web.Request) -> web.Response:
        self.called_at.append(time.monotonic())
        if not self.clone_failures:
            return await super().clone(request)
        self.requests.append((request.path, await request.json()))
        status = self.clone_failures.pop(0)
        detail = "Unsupported language: Klingon" if status == 400 else "overloaded"
        return web.json_response({"detail": detail}, status=status)

    async def voice(self, _: web.Request) -> web.Response:
        self.reference_hits += 1
        if self.reference_failures:
            return web.Response(status=self.reference_failures.pop(0))
        return web.Response(body=self.reference, content_type="audio/wav")


@pytest.fixture
async def flaky(reference_wav: bytes) -> AsyncIterator[FlakyServer]:
    server = FlakyServer(reference=reference_wav)
    app = web.Application()
    app.router.add_post("/clone", server.clone)
    app.router.add_get("/health", server.health)
    app.router.add_get("/voice.wav", server.voice)
    async with serving(app) as url:
        server.url = url
        yield server


class FaultyProxy:
    """Forwards every request to `upstream` as it came (so S3 signatures still hold), except
    that it answers 503 to the next `fail[method]` requests of each method."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.url = ""  # its own, once serving
        self.fail: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self._client = aiohttp.ClientSession(auto_decompress=False)

    async def handle(self, request: web.Request) -> web.Response:
        if self.fail[request.method] > 0:
            self.fail[request.method] -= 1
            self.failed[request.method] += 1
            return web.Response(status=BUSY, text="<Error><Code>ServiceUnavailable</Code></Error>")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _NOT_FORWARDED}
        body = await request.read()
        async with self._client.request(
            request.method,
            URL(self.upstream + request.raw_path, encoded=True),
            headers=headers,
            data=body or None,
            allow_redirects=False,
        ) as answer:
            payload = await answer.read()
            kept = _NOT_RETURNED | ({"content-length"} if request.method != "HEAD" else set())
            returned = {k: v for k, v in answer.headers.items() if k.lower() not in kept}
            return web.Response(status=answer.status, headers=returned, body=payload or None)

    async def close(self) -> None:
        await self._client.close()


_NOT_FORWARDED = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length"})
_NOT_RETURNED = frozenset({"connection", "keep-alive", "transfer-encoding"})


@pytest.fixture
async def s3_proxy(s3_server: S3Server) -> AsyncIterator[FaultyProxy]:
    proxy = FaultyProxy(s3_server.endpoint_url)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    async with serving(app) as url:
        proxy.url = url
        yield proxy
    await proxy.close()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
async def make_pipeline(
    flaky: FlakyServer, registry: CollectorRegistry, tmp_path: Path
) -> AsyncIterator[Callable[..., Pipeline]]:
    """Pipelines on the flaky server (backend and references, not cached: a second fetch
    would show) with `storage` (default: a local directory) and `retry` (default: FAST)."""
    backend = HttpBackend(BackendSettings(kind="http", http={"base_url": flaky.url}))
    await backend.start()
    references = ReferenceSettings(
        allowed_schemes=["http"], allow_private_networks=True, cache_entries=0
    )
    async with (
        ReferenceFetcher(references) as fetcher,
        LocalStorage(tmp_path / "audio") as local,
    ):

        def make(storage: Storage = local, retry: RetrySettings = FAST) -> Pipeline:
            metrics = Metrics(registry)
            return Pipeline(LimitSettings(), fetcher, backend, storage, metrics, retry)

        yield make
    await backend.close()


def request_for(server: FlakyServer, **overrides: object) -> CloneRequest:
    return clone_request(f"{server.url}/voice.wav", **overrides)


def retries(registry: CollectorRegistry, reason: str) -> float | None:
    return registry.get_sample_value("voiceclone_retries_total", {"reason": reason})


async def test_a_backend_outage_is_retried_without_fetching_the_reference_again(
    make_pipeline: Callable[..., Pipeline], flaky: FlakyServer, registry: CollectorRegistry
) -> None:
    flaky.clone_failures = [BUSY, 429]

    ready = await make_pipeline().process(request_for(flaky))

    assert isinstance(ready, AudioReady)
    assert (len(flaky.requests), flaky.reference_hits) == (3, 1)
    assert retries(registry, "backend") == 2
    assert retries(registry, "reference") == 0


async def test_a_reference_outage_is_retried(
    make_pipeline: Callable[..., Pipeline], flaky: FlakyServer, registry: CollectorRegistry
) -> None:
    flaky.reference_failures = [BUSY]

    await make_pipeline().process(request_for(flaky))

    assert (flaky.reference_hits, len(flaky.requests)) == (2, 1)
    assert retries(registry, "reference") == 1


async def test_a_backend_that_stays_down_fails_after_the_last_attempt(
    make_pipeline: Callable[..., Pipeline], flaky: FlakyServer, registry: CollectorRegistry
) -> None:
    flaky.clone_failures = [BUSY] * 10

    with pytest.raises(CloneError) as raised:
        await make_pipeline().process(request_for(flaky))

    error = raised.value
    assert (error.code, error.transient, error.attempts) == (
        ErrorCode.INFERENCE_FAILED,
        True,  # resubmitting later may succeed
        FAST.max_attempts,
    )
    assert len(flaky.requests) == FAST.max_attempts
    assert retries(registry, "backend") == FAST.max_attempts - 1


async def test_a_rejected_request_is_not_retried(
    make_pipeline: Callable[..., Pipeline], flaky: FlakyServer, registry: CollectorRegistry
) -> None:
    flaky.clone_failures = [400, BUSY]

    with pytest.raises(CloneError) as raised:
        await make_pipeline().process(request_for(flaky))

    error = raised.value
    assert (error.code, error.transient, error.attempts) == (
        ErrorCode.UNSUPPORTED_LANGUAGE,
        False,
        1,
    )
    assert len(flaky.requests) == 1
    assert retries(registry, "backend") == 0


async def test_no_attempt_starts_after_the_request_deadline(
    make_pipeline: Callable[..., Pipeline], flaky: FlakyServer
) -> None:
    flaky.clone_failures = [BUSY] * 100
    # Waits of exactly 0.2 s put the last attempt ~0.1 s before the deadline, never in its last
    # milliseconds, where the deadline would cut the call itself short (EXPIRED, a case of its own).
    patient = Unjittered(max_attempts=100, initial_backoff_seconds=0.2, max_backoff_seconds=0.2)
    request = request_for(flaky, deadline=datetime.now(UTC) + timedelta(seconds=1.1))
    deadline = time.monotonic() + 1.1

    with pytest.raises(CloneError) as raised:
        await make_pipeline(retry=patient).process(request)

    assert max(flaky.called_at) < deadline + 0.05  # due before it; a sleep may wake a bit late
    assert raised.value.code == ErrorCode.INFERENCE_FAILED
    assert 2 <= raised.value.attempts == len(flaky.requests) < 10


async def test_a_storage_outage_is_retried(
    make_pipeline: Callable[..., Pipeline],
    flaky: FlakyServer,
    registry: CollectorRegistry,
    s3_proxy: FaultyProxy,
    s3_server: S3Server,
    s3_bucket: str,
) -> None:
    s3_proxy.fail.update({"HEAD": 1, "PUT": 2})  # the lookup once, the upload twice
    storage = S3Storage(
        bucket=s3_bucket,
        endpoint_url=s3_proxy.url,
        region=s3_server.region,
        access_key_id=s3_server.access_key_id,
        secret_access_key=s3_server.secret_access_key,
        addressing_style="path",
        max_attempts=1,  # botocore's own retries would hide the 503s from the pipeline
    )

    async with storage:
        ready = await make_pipeline(storage=storage).process(request_for(flaky))

    assert s3_proxy.failed == Counter({"HEAD": 1, "PUT": 2})
    assert retries(registry, "storage") == 3
    key = ready.storage_uri.removeprefix(f"s3://{s3_bucket}/")
    stored = s3_server.client().get_object(Bucket=s3_bucket, Key=key)["Body"].read()
    assert sha256_of(stored) == ready.sha256
    assert len(flaky.requests) == 1


async def test_the_worker_reports_attempts_and_dead_letters_with_every_header(
    make_memory_settings: WorkerSettingsFactory,
    memory_kafka: MemoryKafka,
    seed_server: SeedServer,
    reference_root: Path,
) -> None:
    settings = make_memory_settings(
        backend=BackendSettings(kind="http", http={"base_url": seed_server.url}), retry=FAST
    )
    seed_server.respond_with = (BUSY, {"detail": "overloaded"})
    request = clone_request((reference_root / "voice.wav").as_uri())
    # Leading zero: never Avro's single-object marker (C3 01), so always a headerless bare body.
    garbage, headers = b"\x00" + os.urandom(63), [("origin", b"test")]
    before_ms = int(time.time() * 1000)

    async with (
        Requests(settings, memory_kafka) as requests,
        Outcomes(settings, memory_kafka) as outcomes,
        running_worker(settings, memory_kafka),
    ):
        await requests.send(request)
        await requests.send_raw(garbage, headers, key=b"garbage-key")
        await outcomes.wait_for([request.request_id])
        await outcomes.wait_for_dead_letters(1)

    failed = outcomes.first(request.request_id)
    assert isinstance(failed, CloneFailed)
    assert (failed.error_code, failed.retryable, failed.attempts) == (
        ErrorCode.INFERENCE_FAILED,
        True,
        FAST.max_attempts,
    )
    assert len(seed_server.requests) == FAST.max_attempts
    (letter,) = outcomes.dead_letters
    assert (letter.key, letter.value) == (b"garbage-key", garbage)
    assert list(letter.headers[: len(headers)]) == headers
    added = {name: value.decode() for name, value in letter.headers[len(headers) :]}
    assert added.keys() == {
        *("dlq.error.type", "dlq.error.reason", "dlq.error.message", "dlq.attempts"),
        *("dlq.original.topic", "dlq.original.partition", "dlq.original.offset"),
        "dlq.timestamp",
    }
    assert (added["dlq.error.type"], added["dlq.error.reason"]) == (
        "EventDecodeError",
        "bad_header",
    )
    assert added["dlq.error.message"]
    assert (added["dlq.original.topic"], added["dlq.attempts"]) == (settings.topics.requests, "1")
    assert int(added["dlq.original.partition"]) in range(3)
    assert int(added["dlq.original.offset"]) >= 0
    assert before_ms <= int(added["dlq.timestamp"]) <= int(time.time() * 1000)


@contextlib.asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """Serve `app` on a free loopback port; yields its base URL."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
