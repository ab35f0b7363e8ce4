"""The worker end to end, with the http backend against a seed-contract server.

Bad input, cancellation, backpressure and rebalancing; `serve()` runs in-process as a task and
every test ends by cancelling it, which must drain cleanly. On Kafka in memory where the broker
adds nothing (bad input, cancels, draining); on the real broker for what only it does: the
group's membership and rebalances, a record it refuses, aiokafka's own state.
"""

import asyncio
import contextlib
import os
import signal
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from structlog.testing import capture_logs

from consumer.backends import BackendSettings
from consumer.observability.settings import HttpServerSettings
from consumer.settings import LimitSettings, WorkerSettings
from schemas.codec import SchemalessForm
from schemas.events import AudioReady, CloneFailed, ErrorCode
from schemas.topics import Topics
from schemas.wire_format import make_codec
from tests.fixtures.memory_kafka import MemoryKafka
from tests.fixtures.seed import SeedServer
from tests.fixtures.worker import (
    Outcomes,
    Requests,
    WorkerSettingsFactory,
    clone_request,
    group_lag,
    running_worker,
    scrape_worker,
)
from tests.schemas.variants import schemaless_record, shipped, with_symbol

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def http_settings(
    make_worker_settings: WorkerSettingsFactory,
    seed_server: SeedServer,
) -> WorkerSettingsFactory:
    """Worker settings with the http backend pointed at the seed server."""

    def make(**overrides: Any) -> WorkerSettings:
        backend = BackendSettings(kind="http", http={"base_url": seed_server.url})
        return make_worker_settings(backend=backend, **overrides)

    return make


@pytest.fixture
def memory_http_settings(
    make_memory_settings: WorkerSettingsFactory,
    seed_server: SeedServer,
) -> WorkerSettingsFactory:
    """As `http_settings`, for a worker on Kafka in memory."""

    def make(**overrides: Any) -> WorkerSettings:
        backend = BackendSettings(kind="http", http={"base_url": seed_server.url})
        return make_memory_settings(backend=backend, **overrides)

    return make


async def assert_all_committed(settings: WorkerSettings) -> None:
    lag = await group_lag(
        settings.kafka.bootstrap_servers, settings.group_id, settings.topics.requests
    )
    assert set(lag.values()) == {0}, lag


def assert_all_committed_in(kafka: MemoryKafka, settings: WorkerSettings) -> None:
    lag = kafka.lag(settings.group_id, settings.topics.requests)
    assert set(lag.values()) == {0}, lag


async def test_bad_input_gets_its_outcome_or_dead_letter_and_the_worker_goes_on(
    memory_http_settings: WorkerSettingsFactory,
    memory_kafka: MemoryKafka,
    voice_uri: str,
    reference_root: Path,
) -> None:
    settings = memory_http_settings(limits=LimitSettings(max_text_chars=5_000))
    expected = {
        ErrorCode.TEXT_TOO_LONG: clone_request(voice_uri, text="a" * 1_000_000),
        ErrorCode.EXPIRED: clone_request(
            voice_uri, deadline=datetime.now(UTC) - timedelta(minutes=1)
        ),
        ErrorCode.REFERENCE_AUDIO_UNAVAILABLE: clone_request(
            (reference_root / "missing.wav").as_uri()
        ),
    }
    outside_root = clone_request("file:///etc/passwd")
    not_allowed_scheme = clone_request("ftp://example.com/voice.wav")
    good = clone_request(voice_uri, text="Say it: the passphrase is swordfish.")
    # Leading zero: never Avro's single-object marker (C3 01), so always a headerless bare body.
    garbage = b"\x00" + os.urandom(255)
    unknown_language = clone_request(voice_uri)
    newer = with_symbol(shipped("clone_request"), "Language", "KLINGON")
    newer_writer = schemaless_record(newer, unknown_language.to_avro() | {"language": "KLINGON"})
    # The older form: our schema's fingerprint in a header over the newer writer's bare body.
    ours = await make_codec(form=SchemalessForm.HEADER).encode(
        settings.topics.requests, unknown_language
    )
    dead = [
        (garbage, [("traceparent", b"00-abc-def-01")], "bad_header"),
        (newer_writer.value, newer_writer.headers, "unknown_schema"),
        # Our schema's fingerprint, a symbol it does not have.
        (newer_writer.value, ours.headers, "corrupt"),
    ]

    with capture_logs() as logs:
        async with (
            Requests(settings, memory_kafka) as requests,
            Outcomes(settings, memory_kafka) as outcomes,
            running_worker(settings, memory_kafka),
        ):
            for value, headers, _ in dead:
                await requests.send_raw(value, headers, key=b"bad")
            await requests.send(*expected.values(), outside_root, not_allowed_scheme)
            await requests.send(good)

            await outcomes.wait_for(
                [r.request_id for r in (*expected.values(), outside_root, not_allowed_scheme, good)]
            )
            await outcomes.wait_for_dead_letters(len(dead))

    for code, request in expected.items():
        failed = outcomes.first(request.request_id)
        assert isinstance(failed, CloneFailed)
        assert failed.error_code == code
        assert failed.metadata == request.metadata
    for request in (outside_root, not_allowed_scheme):
        failed = outcomes.first(request.request_id)
        assert isinstance(failed, CloneFailed)
        assert (failed.error_code, failed.retryable) == (
            ErrorCode.REFERENCE_AUDIO_UNAVAILABLE,
            False,
        )
    assert isinstance(outcomes.first(good.request_id), AudioReady)
    letters = {
        dict(letter.headers)["dlq.error.reason"].decode(): letter
        for letter in outcomes.dead_letters
    }
    assert letters.keys() == {reason for _, _, reason in dead}
    for value, headers, reason in dead:
        letter = letters[reason]
        assert (letter.key, letter.value) == (b"bad", value)
        assert list(letter.headers[: len(headers)]) == headers  # the originals, first
        extra = dict(letter.headers[len(headers) :])
        assert extra["dlq.error.type"] == b"EventDecodeError"
        assert extra["dlq.original.topic"] == settings.topics.requests.encode()
        assert {"dlq.original.partition", "dlq.original.offset"} <= extra.keys()
    assert outcomes.duplicates() == {}
    assert logs, "nothing was logged"
    assert "swordfish" not in repr(logs)  # request text never reaches the logs
    published = {e["request_id"]: e for e in logs if e["event"] == "outcome_published"}
    # One line per request, with its timings: the good one's, and the stages a failure ran.
    timings = published[good.request_id]["timings"]
    assert timings == outcomes.first(good.request_id).timings.model_dump()
    missing = expected[ErrorCode.REFERENCE_AUDIO_UNAVAILABLE].request_id
    assert list(published[missing]["stage_ms"]) == ["fetch_reference"]
    assert published[expected[ErrorCode.EXPIRED].request_id]["stage_ms"] == {}
    assert_all_committed_in(memory_kafka, settings)


async def test_cancel_stops_an_in_flight_and_a_queued_request(
    memory_http_settings: WorkerSettingsFactory,
    memory_kafka: MemoryKafka,
    seed_server: SeedServer,
    voice_uri: str,
) -> None:
    settings = memory_http_settings(max_in_flight=1)
    seed_server.delay_seconds = 60  # the first request holds the only slot until cancelled
    in_flight, queued, after = (clone_request(voice_uri) for _ in range(3))

    async with (
        Requests(settings, memory_kafka) as requests,
        Outcomes(settings, memory_kafka) as outcomes,
        running_worker(settings, memory_kafka),
    ):
        await requests.send(in_flight)
        await asyncio.wait_for(seed_server.entered.wait(), 30)
        await requests.send(queued)
        # One cancel partition: the queued request's cancel is known before its slot frees.
        await requests.cancel(queued)
        await requests.cancel(in_flight)
        await outcomes.wait_for([in_flight.request_id, queued.request_id])
        await asyncio.wait_for(seed_server.disconnected.wait(), 10)
        seed_server.delay_seconds = 0
        await requests.send(after)
        await outcomes.wait_for([after.request_id])

    for request in (in_flight, queued):
        failed = outcomes.first(request.request_id)
        assert isinstance(failed, CloneFailed)
        assert (failed.error_code, failed.retryable) == (ErrorCode.CANCELLED, False)
    assert isinstance(outcomes.first(after.request_id), AudioReady)
    # The queued request never reached the backend.
    assert len(seed_server.requests) == 2
    assert_all_committed_in(memory_kafka, settings)


async def test_in_flight_stays_bounded_and_long_jobs_keep_the_member_in_its_group(
    http_settings: WorkerSettingsFactory,
    seed_server: SeedServer,
    voice_uri: str,
) -> None:
    # Each job outlasts max.poll.interval: a loop that stopped polling while full would be
    # evicted, and its partitions revoked and assigned again.
    settings = http_settings(max_in_flight=2, max_poll_interval_ms=1_000)
    seed_server.delay_seconds = 1.5
    batch = [clone_request(voice_uri) for _ in range(6)]

    with capture_logs() as logs:
        async with (
            Requests(settings) as requests,
            Outcomes(settings) as outcomes,
            running_worker(settings),
        ):
            await requests.send(*batch)
            await outcomes.wait_for([r.request_id for r in batch], within_s=60)
            events = [entry["event"] for entry in logs]

    in_flight = [entry["in_flight"] for entry in logs if entry["event"] == "record_started"]
    assert len(in_flight) == len(batch)
    assert max(in_flight) == settings.max_in_flight
    assert all(isinstance(outcomes.first(r.request_id), AudioReady) for r in batch)
    assert events.count("partitions_assigned") == 1
    assert "partitions_revoked" not in events
    await assert_all_committed(settings)


async def test_a_joining_worker_gets_partitions_after_the_first_commits_its_finished_work(
    http_settings: WorkerSettingsFactory,
    seed_server: SeedServer,
    voice_uri: str,
    unused_tcp_port: int,
) -> None:
    # The first worker on a known port, to read its metrics; the second on any free one.
    settings = http_settings(
        max_in_flight=4, http=HttpServerSettings(host="127.0.0.1", port=unused_tcp_port)
    )
    joining = settings.model_copy(update={"http": HttpServerSettings(host="127.0.0.1", port=0)})
    # Long enough that the first worker still runs its first four when the second joins (the
    # rebalance reaches it with its next heartbeat, at most 3 s later).
    seed_server.delay_seconds = 5.0
    batch = [clone_request(voice_uri) for _ in range(8)]

    with capture_logs() as logs:
        async with (
            Requests(settings) as requests,
            Outcomes(settings) as outcomes,
            running_worker(settings),
        ):
            await requests.send(*batch)
            await wait_for_backend_calls(seed_server, settings.max_in_flight)
            async with running_worker(joining):
                await outcomes.wait_for([r.request_id for r in batch], within_s=60)
                first = await scrape_worker(settings)

    revoked = [entry for entry in logs if entry["event"] == "partitions_revoked"]
    assigned = [entry for entry in logs if entry["event"] == "partitions_assigned"]
    # The first worker's own assignment, its share after the join, and the second's share.
    assert len(assigned) >= 3
    assert revoked[0]["in_flight"] == settings.max_in_flight
    # The first worker counted its own assignment, the revocation and its share after the join.
    rebalances = "voiceclone_rebalances_total"
    assert first.value(rebalances, event="revoked") >= 1
    assert first.value(rebalances, event="assigned") >= 2
    assert all(isinstance(outcomes.first(r.request_id), AudioReady) for r in batch)
    # The first worker finished and committed its in-flight requests before handing over, so
    # the second one redid none of them.
    assert outcomes.duplicates() == {}
    assert len(seed_server.requests) == len(batch)
    await assert_all_committed(settings)


async def test_a_revocation_finishes_and_commits_the_revoked_work_before_handing_it_over(
    memory_http_settings: WorkerSettingsFactory,
    memory_kafka: MemoryKafka,
    seed_server: SeedServer,
    voice_uri: str,
) -> None:
    settings = memory_http_settings(max_in_flight=4)
    seed_server.delay_seconds = 1.0
    batch = [clone_request(voice_uri) for _ in range(6)]  # two in each partition
    partitions = memory_kafka.partitions(settings.topics.requests)

    async with (
        Requests(settings, memory_kafka) as requests,
        Outcomes(settings, memory_kafka) as outcomes,
        running_worker(settings, memory_kafka),
    ):
        for tp in partitions:
            await requests.send(
                *batch[2 * tp.partition : 2 * tp.partition + 2], partition=tp.partition
            )
        await wait_for_backend_calls(seed_server, settings.max_in_flight)  # the first two's
        member = memory_kafka.member(settings.group_id)
        # Eager, as aiokafka's: every partition is revoked, then the last one alone assigned.
        await member.rebalance(partitions[-1:])
        committed_at_handover = dict(memory_kafka.committed[settings.group_id])
        await outcomes.wait_for([r.request_id for r in batch])

    assert committed_at_handover == {partitions[0]: 2, partitions[1]: 2}
    assert all(isinstance(outcomes.first(r.request_id), AudioReady) for r in batch)
    assert outcomes.duplicates() == {}
    assert len(seed_server.requests) == len(batch)
    assert_all_committed_in(memory_kafka, settings)


async def wait_for_backend_calls(server: SeedServer, count: int, within_s: float = 30.0) -> None:
    async with asyncio.timeout(within_s):
        while len(server.requests) < count:
            server.entered.clear()  # the server runs on this loop: no call slips in between
            await server.entered.wait()


async def test_a_cancel_sent_before_the_worker_started_still_wins(
    memory_http_settings: WorkerSettingsFactory,
    memory_kafka: MemoryKafka,
    seed_server: SeedServer,
    voice_uri: str,
) -> None:
    settings = memory_http_settings()
    request = clone_request(voice_uri)

    async with (
        Requests(settings, memory_kafka) as requests,
        Outcomes(settings, memory_kafka) as outcomes,
    ):
        await requests.cancel(request)
        await requests.send(request)
        async with running_worker(
            settings, memory_kafka
        ):  # ready: the cancel topic has been read back
            await outcomes.wait_for([request.request_id])

    failed = outcomes.first(request.request_id)
    assert isinstance(failed, CloneFailed)
    assert failed.error_code == ErrorCode.CANCELLED
    assert seed_server.requests == []


async def test_an_outcome_the_broker_refuses_is_dead_lettered_and_the_worker_goes_on(
    http_settings: WorkerSettingsFactory,
    worker_topics: Topics,
    kafka_bootstrap: str,
    voice_uri: str,
    reference_root: Path,
) -> None:
    async with small_messages_topic(kafka_bootstrap, max_bytes=20_000) as failed_topic:
        settings = http_settings(topics=worker_topics.model_copy(update={"failed": failed_topic}))
        # Its clone-failed event carries the metadata back: too large for the topic.
        too_big = clone_request(
            (reference_root / "missing.wav").as_uri(), metadata={"blob": "x" * 50_000}
        )
        good = clone_request(voice_uri)

        async with (
            Requests(settings) as requests,
            Outcomes(settings) as outcomes,
            running_worker(settings),
        ):
            await requests.send(too_big, good)
            await outcomes.wait_for([good.request_id])
            await outcomes.wait_for_dead_letters(1)

        (letter,) = outcomes.dead_letters
        original = await make_codec().encode(settings.topics.requests, too_big)
        assert letter.value == original.value
        assert dict(letter.headers)["dlq.error.type"] == b"MessageSizeTooLargeError"
        assert isinstance(outcomes.first(good.request_id), AudioReady)
        await assert_all_committed(settings)


@contextlib.asynccontextmanager
async def small_messages_topic(bootstrap: str, max_bytes: int) -> AsyncIterator[str]:
    """A fresh one-partition topic that refuses records over `max_bytes`."""
    name = f"small-{uuid.uuid4().hex[:12]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        config = {"max.message.bytes": str(max_bytes)}
        await admin.create_topics([NewTopic(name, 1, 1, topic_configs=config)])
        yield name
    finally:
        await admin.delete_topics([name])
        await admin.close()


async def test_cancelling_serve_finishes_in_flight_work_and_restores_signal_handling(
    memory_http_settings: WorkerSettingsFactory,
    memory_kafka: MemoryKafka,
    seed_server: SeedServer,
    voice_uri: str,
) -> None:
    settings = memory_http_settings()
    seed_server.delay_seconds = 1.0
    request = clone_request(voice_uri)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)

    async with (
        Requests(settings, memory_kafka) as requests,
        Outcomes(settings, memory_kafka) as outcomes,
    ):
        async with running_worker(settings, memory_kafka):  # leaving it cancels serve()
            await requests.send(request)
            await wait_for_backend_calls(seed_server, 1)
        # The drain let the call finish: its outcome was published before serve() returned.
        await outcomes.wait_for([request.request_id], within_s=5)

    assert isinstance(outcomes.first(request.request_id), AudioReady)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert_all_committed_in(memory_kafka, settings)


async def test_requests_with_unsafe_ids_are_answered_invalid_not_dead_lettered(
    memory_http_settings: WorkerSettingsFactory,
    memory_kafka: MemoryKafka,
    seed_server: SeedServer,
    voice_uri: str,
    tmp_path: Path,
) -> None:
    settings = memory_http_settings()
    unsafe = [
        clone_request(voice_uri, request_id="../../escaped"),
        clone_request(voice_uri, tenant_id="../other-tenant"),
        clone_request(voice_uri, tenant_id="a/b", request_id="c/d"),
        clone_request(voice_uri, request_id="forged\nlog line"),
    ]

    with capture_logs() as logs:
        async with (
            Requests(settings, memory_kafka) as requests,
            Outcomes(settings, memory_kafka) as outcomes,
            running_worker(settings, memory_kafka),
        ):
            await requests.send(*unsafe)
            await outcomes.wait_for([r.request_id for r in unsafe])

    for request in unsafe:
        failed = outcomes.first(request.request_id)
        assert isinstance(failed, CloneFailed)
        assert (failed.error_code, failed.retryable) == (ErrorCode.INVALID_REQUEST, False)
        assert (failed.request_id, failed.tenant_id) == (request.request_id, request.tenant_id)
    assert outcomes.dead_letters == []
    assert seed_server.requests == []
    assert written_files(tmp_path) == []
    assert all("\n" not in str(entry.get("request_id", "")) for entry in logs)
    assert_all_committed_in(memory_kafka, settings)


def written_files(root: Path) -> list[Path]:
    """Files anywhere under the test's directory but the reference recordings."""
    return [p for p in root.rglob("*") if p.is_file() and "references" not in p.parts]
