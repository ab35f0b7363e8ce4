"""Hostile input end to end: poison records interleaved with good requests in one partition.

Every poison record must end as a dead letter carrying its original key, value and headers
byte for byte, or as a clone-failed event with the right code; every good request around it
still gets its audio; `serve()` never stops; and the group's committed offset reaches the end.
The one exception, a record the Kafka client itself cannot parse, stops its partition alone
(the test near the end).

The bad input test_worker.py already sends (random bytes with a trace header, a newer writer
schema, an unknown enum symbol, text too long, expired, missing or forbidden references) is
not repeated here.
"""

import asyncio
import random
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer, ConsumerRecord
from aiokafka.record.default_records import DefaultRecordBatchBuilder, _DefaultRecordBatchBuilderPy
from structlog.testing import capture_logs

from consumer.backends import BackendSettings
from consumer.observability.settings import HttpServerSettings
from consumer.settings import ProcessingGuarantee, WorkerSettings
from schemas.codec import (
    EVENT_TYPE_HEADER,
    FINGERPRINT_HEADER,
    SINGLE_OBJECT_MARKER,
    SINGLE_OBJECT_PREFIX_BYTES,
    SchemalessForm,
)
from schemas.events import AudioReady, CloneFailed, CloneRequest, ErrorCode, Event
from schemas.topics import Topics
from schemas.wire_format import make_codec
from tests.consumer.test_worker import small_messages_topic
from tests.fixtures.kafka import TopicFactory
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
from tests.schemas.samples import full_audio_ready, full_cancel
from tests.schemas.variants import schemaless_record, shipped

pytestmark = pytest.mark.timeout(120)

Headers = list[tuple[str, bytes | None]]
# aiokafka's default max_request_size, which the test's producer and the worker's share.
PRODUCER_MAX_REQUEST_BYTES = 1_048_576
# The older schemaless form, whose fingerprint header most poisons garble; single-object
# poisons are made from SINGLE_OBJECT's records.
CODEC = make_codec(form=SchemalessForm.HEADER)
SINGLE_OBJECT = make_codec()


@dataclass(frozen=True)
class Poison:
    """A record that must be dead-lettered, and the reason its dlq.error.reason header gives."""

    name: str
    value: bytes | None
    headers: Headers
    reason: str
    keyed: bool = True

    @property
    def key(self) -> bytes | None:
        return f"poison-{self.name}".encode() if self.keyed else None


@pytest.fixture
async def one_partition_settings(
    make_worker_settings: WorkerSettingsFactory,
    worker_topics: Topics,
    topic_factory: TopicFactory,
    seed_server: SeedServer,
) -> WorkerSettings:
    """Worker settings (http backend on the seed server) whose requests topic has one
    partition, so the poison and the good requests queue behind each other."""
    requests = await topic_factory("requests", partitions=1)
    return make_worker_settings(
        backend=BackendSettings(kind="http", http={"base_url": seed_server.url}),
        topics=worker_topics.model_copy(update={"requests": requests}),
    )


async def encoded(topic: str, event: Event) -> tuple[bytes, Headers]:
    result = await CODEC.encode(topic, event)
    return result.value, list(result.headers)


async def poison_records(topic: str, victim: CloneRequest) -> list[Poison]:
    """One of each kind of poison; the truncations and relabellings are of `victim`'s encoding."""
    value, headers = await encoded(topic, victim)
    fingerprint = dict(headers)[FINGERPRINT_HEADER]
    audio_ready, audio_ready_headers = await encoded(topic, full_audio_ready())
    cancel, cancel_headers = await encoded(topic, full_cancel())
    noise = random.Random(20_240_229)  # the same bytes every run
    return [
        Poison("random", noise.randbytes(300), [], "bad_header"),
        Poison("random-with-our-headers", noise.randbytes(300), headers, "corrupt"),
        *(
            Poison(f"truncated-{size}", value[:size], headers, "corrupt")
            for size in (1, 9, len(value) // 2, len(value) - 1)
        ),
        Poison("truncated-to-nothing", b"", headers, "empty"),
        Poison("null-value", None, headers, "empty"),
        Poison("null-value-no-headers", None, [], "empty"),
        Poison("audio-ready", audio_ready, audio_ready_headers, "wrong_type"),
        Poison("cancel", cancel, cancel_headers, "wrong_type"),
        # A request whose fingerprint names another schema than its type header.
        Poison(
            "request-with-audio-ready-fingerprint",
            value,
            [(FINGERPRINT_HEADER, dict(audio_ready_headers)[FINGERPRINT_HEADER]), headers[1]],
            "bad_header",
        ),
        # A request's bytes read with the cancel schema it claims.
        Poison(
            "request-with-cancel-fingerprint",
            value,
            [(FINGERPRINT_HEADER, dict(cancel_headers)[FINGERPRINT_HEADER])],
            "corrupt",
        ),
        # Read, but with no id to answer under (invalid requests with ids are answered).
        Poison(
            "empty-request-id",
            *_schemaless(victim.to_avro() | {"request_id": ""}),
            "invalid_record",
        ),
        *_garbage_headers(value, headers, fingerprint),
        *await _single_object_poisons(topic, victim, dict(cancel_headers)[FINGERPRINT_HEADER]),
        # About a megabyte: far more than any request, but within what Kafka takes.
        Poison("megabyte-of-noise", noise.randbytes(1_000_000), headers, "corrupt"),
    ]


def _schemaless(record: dict[str, Any]) -> tuple[bytes, Headers]:
    written = schemaless_record(shipped("clone_request"), record)
    return written.value, list(written.headers)


async def _single_object_poisons(
    topic: str, victim: CloneRequest, other_fingerprint: bytes
) -> list[Poison]:
    value = (await SINGLE_OBJECT.encode(topic, victim)).value
    body = value[SINGLE_OBJECT_PREFIX_BYTES:]
    return [
        Poison("single-object-cut-short", value[:9], [], "corrupt"),
        Poison(
            "single-object-unknown-fingerprint",
            SINGLE_OBJECT_MARKER + b"\x01" * 8 + body,
            [],
            "unknown_schema",
        ),
        Poison(
            "single-object-header-disagrees",
            value,
            [(FINGERPRINT_HEADER, other_fingerprint)],
            "bad_header",
        ),
    ]


def _garbage_headers(value: bytes, headers: Headers, fingerprint: bytes) -> list[Poison]:
    """A valid request's bytes under headers that do not let it be read."""
    type_header = headers[1]
    return [
        # Kafka allows repeated headers; the last one counts, and it is cut short.
        Poison(
            "last-fingerprint-cut-short",
            value,
            [(FINGERPRINT_HEADER, fingerprint), (FINGERPRINT_HEADER, fingerprint[:7]), type_header],
            "bad_header",
        ),
        Poison("null-fingerprint", value, [(FINGERPRINT_HEADER, None), type_header], "bad_header"),
        Poison(
            "type-header-says-audio-ready",
            value,
            [(FINGERPRINT_HEADER, fingerprint), (EVENT_TYPE_HEADER, AudioReady.avro_name.encode())],
            "bad_header",
        ),
        Poison(
            "binary-junk-headers",
            value,
            [("", b"\x00\xff"), ("\u202e\U0001f4a3", None), ("x" * 1000, b"\xfe" * 1000)],
            "bad_header",
        ),
    ]


def junk_but_harmless_headers() -> Headers:
    """Headers the codec does not read: a good request carrying them is still served."""
    return [
        ("traceparent", b"\xff\x00 not a trace context"),
        ("tracestate", None),
        ("", b""),
        ("\U0001f3a4", b"\x80" * 64),
        *((f"h{i}", bytes([i])) for i in range(100)),
    ]


async def send_poison(requests: Requests, poison: Poison) -> None:
    await requests.send_raw(poison.value, poison.headers, key=poison.key)  # type: ignore[arg-type]


async def until(
    outcomes: Awaitable[None], serving: asyncio.Task[None], within_s: float = 60.0
) -> None:
    """Await `outcomes` (a wait on the Outcomes reader), failing at once if `serve()` ends."""
    waiting = asyncio.ensure_future(outcomes)
    done, _ = await asyncio.wait(
        {waiting, serving}, timeout=within_s, return_when=asyncio.FIRST_COMPLETED
    )
    if serving in done:
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        raise AssertionError(f"serve() stopped while handling poison: {serving.exception()!r}")
    await waiting  # raises its own timeout, naming what is missing


def letter_for(letters: list[ConsumerRecord], poison: Poison) -> ConsumerRecord:
    (letter,) = [letter for letter in letters if letter.key == poison.key]
    return letter


def check_dead_letter(letter: ConsumerRecord, poison: Poison, topic: str) -> list[str]:
    """What is wrong with `poison`'s dead letter; empty when it is right."""
    problems = []
    if (letter.key, letter.value) != (poison.key, poison.value):
        problems.append("key or value differ from the original")
    if list(letter.headers[: len(poison.headers)]) != poison.headers:
        problems.append(f"original headers not first: {letter.headers[: len(poison.headers)]}")
    extra = dict(letter.headers[len(poison.headers) :])
    if extra.get("dlq.error.reason") != poison.reason.encode():
        problems.append(f"reason {extra.get('dlq.error.reason')!r}, not {poison.reason!r}")
    if extra.get("dlq.original.topic") != topic.encode():
        problems.append(f"original topic {extra.get('dlq.original.topic')!r}")
    return problems


async def assert_all_committed(settings: WorkerSettings) -> None:
    lag = await group_lag(
        settings.kafka.bootstrap_servers, settings.group_id, settings.topics.requests
    )
    assert set(lag.values()) == {0}, f"records past the committed offset: {lag}"


async def test_poison_is_dead_lettered_byte_for_byte_and_good_requests_go_on(
    one_partition_settings: WorkerSettings, voice_uri: str
) -> None:
    settings = one_partition_settings
    topic = settings.topics.requests
    good = [clone_request(voice_uri) for _ in range(4)]
    noisy = clone_request(voice_uri)  # served despite junk headers
    too_long = clone_request(voice_uri, text="a" * 900_000)  # close to Kafka's 1 MiB
    blank = clone_request(voice_uri, text=" \n\t\u3000")
    failed = {
        too_long.request_id: ErrorCode.TEXT_TOO_LONG,
        blank.request_id: ErrorCode.INVALID_REQUEST,
    }
    poisons = await poison_records(topic, good[0])
    assert len({poison.key for poison in poisons}) == len(poisons)

    async with (
        Requests(settings) as requests,
        Outcomes(settings) as outcomes,
        running_worker(settings) as serving,
    ):
        await requests.send(good[0])
        for i, poison in enumerate(poisons):
            await send_poison(requests, poison)
            if i == len(poisons) // 2:
                await requests.send(good[1], too_long, blank)
                await requests.send(noisy, headers=junk_but_harmless_headers())
        await requests.send(*good[2:])  # after all the poison: the worker must have gone on

        served = [r.request_id for r in (*good, noisy, too_long, blank)]
        await until(outcomes.wait_for(served), serving)
        await until(outcomes.wait_for_dead_letters(len(poisons)), serving)

    for request in (*good, noisy):
        assert isinstance(outcomes.first(request.request_id), AudioReady), request.request_id
    for request_id, code in failed.items():
        outcome = outcomes.first(request_id)
        assert isinstance(outcome, CloneFailed)
        assert (outcome.error_code, outcome.retryable) == (code, False)
    problems = {
        poison.name: check_dead_letter(letter_for(outcomes.dead_letters, poison), poison, topic)
        for poison in poisons
    }
    assert {name: found for name, found in problems.items() if found} == {}
    assert len(outcomes.dead_letters) == len(poisons)  # no good request among them
    offsets = {dict(letter.headers)["dlq.original.offset"] for letter in outcomes.dead_letters}
    assert len(offsets) == len(poisons)
    assert outcomes.duplicates() == {}
    await assert_all_committed(settings)


async def test_a_record_near_the_size_limit_is_dead_lettered_whole(
    one_partition_settings: WorkerSettings, voice_uri: str
) -> None:
    bootstrap = one_partition_settings.kafka.bootstrap_servers
    poison = Poison("near-the-limit", near_limit_value(), [], "bad_header")
    # What the deployment must give the DLQ: room for the largest request plus dlq.* headers.
    async with small_messages_topic(bootstrap, max_bytes=4 * 1024 * 1024) as big_dlq:
        topics = one_partition_settings.topics.model_copy(update={"dlq": big_dlq})
        settings = one_partition_settings.model_copy(update={"topics": topics})
        outcomes = await poison_between_good_requests(settings, voice_uri, poison)

    letter = letter_for(outcomes.dead_letters, poison)
    assert check_dead_letter(letter, poison, settings.topics.requests) == []
    await assert_all_committed(settings)


def near_limit_value() -> bytes:
    """Random bytes as large as aiokafka's default producer sends with our key and no headers."""
    overhead = DefaultRecordBatchBuilder.estimate_size_in_bytes(b"poison-near-the-limit", b"", [])
    return random.Random(7).randbytes(PRODUCER_MAX_REQUEST_BYTES - overhead)


class RawName(str):
    """A header name whose bytes on the wire are `raw`, which need not be UTF-8."""

    raw: bytes

    def __new__(cls, raw: bytes) -> "RawName":
        name = super().__new__(cls, raw.decode("utf-8", "replace"))
        name.raw = raw
        return name

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return self.raw


async def send_any_record(
    bootstrap: str, topic: str, key: bytes | None, value: bytes | None, headers: Headers
) -> None:
    """Produce one record to partition 0 that other Kafka clients can write but aiokafka's
    send() refuses: no key and no value, or header names that are not UTF-8 (`RawName`)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        batch = producer.create_batch()
        # The pure-Python builder writes whatever bytes a header name's encode() returns.
        batch._builder = _DefaultRecordBatchBuilderPy(
            2, 0, is_transactional=0, producer_id=-1, producer_epoch=-1, base_sequence=0,
            batch_size=PRODUCER_MAX_REQUEST_BYTES,
        )  # fmt: skip
        assert batch.append(timestamp=None, key=key, value=value, headers=headers) is not None
        await (await producer.send_batch(batch, topic, partition=0))
    finally:
        await producer.stop()


async def poison_between_good_requests(
    settings: WorkerSettings, voice_uri: str, poison: Poison
) -> Outcomes:
    """Send a good request, `poison` (with `send_any_record`), and another good request; wait
    until both good ones are served and the poison is dead-lettered, then stop the worker."""
    before, after = clone_request(voice_uri), clone_request(voice_uri)
    async with (
        Requests(settings) as requests,
        Outcomes(settings) as outcomes,
        running_worker(settings) as serving,
    ):
        await requests.send(before)
        await until(outcomes.wait_for([before.request_id]), serving)
        await send_any_record(
            settings.kafka.bootstrap_servers,
            settings.topics.requests,
            poison.key,
            poison.value,
            poison.headers,
        )
        await requests.send(after)
        await until(outcomes.wait_for([after.request_id]), serving, within_s=30)
        await until(outcomes.wait_for_dead_letters(1, within_s=8), serving)
    assert isinstance(outcomes.first(after.request_id), AudioReady)
    return outcomes


async def test_a_record_the_client_cannot_parse_stops_its_partition_alone(
    make_worker_settings: WorkerSettingsFactory,
    worker_topics: Topics,
    topic_factory: TopicFactory,
    seed_server: SeedServer,
    voice_uri: str,
) -> None:
    # aiokafka's record parser fails the whole fetch of a record whose header name is not
    # UTF-8, every time: no consumer of ours can read past it. The worker pauses that partition
    # at it, says where it is, and serves the others.
    settings = make_worker_settings(
        backend=BackendSettings(kind="http", http={"base_url": seed_server.url}),
        topics=worker_topics.model_copy(
            update={"requests": await topic_factory("requests", partitions=2)}
        ),
    )
    before, behind, elsewhere = (clone_request(voice_uri) for _ in range(3))
    with capture_logs() as logs:
        async with (
            Requests(settings) as requests,
            Outcomes(settings) as outcomes,
            running_worker(settings) as serving,
        ):
            await requests.send(before, partition=0)  # offset 0
            await until(outcomes.wait_for([before.request_id]), serving)
            await send_any_record(  # offset 1
                settings.kafka.bootstrap_servers,
                settings.topics.requests,
                b"poison",
                b"\x00" * 40,
                [(RawName(b"\xff\xfe"), b"1")],
            )
            await requests.send(behind, partition=0)  # offset 2
            await until(logged(logs, "partition_unreadable"), serving)
            await requests.send(elsewhere, partition=1)
            await until(outcomes.wait_for([elsewhere.request_id]), serving)

    (unreadable,) = [entry for entry in logs if entry["event"] == "partition_unreadable"]
    assert (unreadable["partition"], unreadable["offset"]) == (0, 1)
    assert behind.request_id not in outcomes.by_id
    lag = await group_lag(
        settings.kafka.bootstrap_servers, settings.group_id, settings.topics.requests
    )
    assert lag == {0: 2, 1: 0}  # all committed up to the unreadable record


async def logged(logs: list[dict[str, Any]], event: str) -> None:
    """Until `event` is among the captured log entries (a plain list: nothing to wait on)."""
    while not any(entry["event"] == event for entry in logs):  # noqa: ASYNC110
        await asyncio.sleep(0.05)


async def test_a_record_without_key_or_value_is_dead_lettered(
    one_partition_settings: WorkerSettings, voice_uri: str
) -> None:
    poison = Poison("nothing", None, [("traceparent", b"00-abc-def-01")], "empty", keyed=False)

    outcomes = await poison_between_good_requests(one_partition_settings, voice_uri, poison)

    letter = letter_for(outcomes.dead_letters, poison)
    assert check_dead_letter(letter, poison, one_partition_settings.topics.requests) == []
    await assert_all_committed(one_partition_settings)


# Invalid requests: read, but breaking a rule of the contract


@dataclass(frozen=True)
class Invalid:
    """A request record that breaks one rule; `field` is what its clone-failed must name."""

    name: str
    record: dict[str, Any]
    field: str

    @property
    def request_id(self) -> str:
        return str(self.record["request_id"])


def invalid_requests(voice_uri: str) -> list[Invalid]:
    """Requests the codec refuses to encode, so written with plain fastavro as another team's
    producer could."""

    def breaking(part: str, **changes: object) -> dict[str, Any]:
        record = clone_request(voice_uri, text="do not echo me").to_avro()
        record[part] = {**record[part], **changes}
        return record

    return [
        *(
            Invalid(f"{value}-temperature", breaking("generation", temperature=value), field)
            for value, field in [
                (float("nan"), "generation.temperature"),
                (float("inf"), "generation.temperature"),
                (float("-inf"), "generation.temperature"),
            ]
        ),
        Invalid("empty-voice-id", breaking("voice", voice_id=""), "voice.voice_id"),
        Invalid(
            "bad-sha256",
            breaking("voice", reference_audio_sha256="not-a-sha"),
            "voice.reference_audio_sha256",
        ),
    ]


@pytest.mark.parametrize("guarantee", list(ProcessingGuarantee))
async def test_invalid_requests_are_answered_invalid_request_not_dead_lettered(
    one_partition_settings: WorkerSettings,
    voice_uri: str,
    unused_tcp_port: int,
    guarantee: ProcessingGuarantee,
) -> None:
    settings = one_partition_settings.model_copy(
        update={
            "processing_guarantee": guarantee,
            "http": HttpServerSettings(host="127.0.0.1", port=unused_tcp_port),
        }
    )
    invalid = invalid_requests(voice_uri)
    # Readable, but not answerable: an empty id addresses nobody.
    no_id = clone_request(voice_uri).to_avro() | {"request_id": ""}
    no_tenant = invalid[0].record | {"tenant_id": "", "request_id": "no-tenant"}
    good = clone_request(voice_uri)

    with capture_logs() as logs:
        async with (
            Requests(settings) as requests,
            Outcomes(settings) as outcomes,
            running_worker(settings) as serving,
        ):
            for record in (*(i.record for i in invalid), no_id, no_tenant):
                await requests.send_raw(*_schemaless(record), key=record["request_id"].encode())
            await requests.send(good)
            await until(outcomes.wait_for([i.request_id for i in invalid]), serving)
            await until(outcomes.wait_for([good.request_id]), serving)
            await until(outcomes.wait_for_dead_letters(2), serving)
            scrape = await scrape_worker(settings)
            await outcomes.read_to_end()

    for case in invalid:
        (failed,) = outcomes.by_id[case.request_id]  # exactly one answer
        assert isinstance(failed, CloneFailed), case.name
        assert (failed.error_code, failed.retryable, failed.attempts) == (
            ErrorCode.INVALID_REQUEST,
            False,
            1,
        )
        assert case.field in failed.message, (case.name, failed.message)
        assert "do not echo me" not in failed.message
        assert failed.tenant_id == case.record["tenant_id"]
        assert failed.metadata == case.record["metadata"]
    assert isinstance(outcomes.first(good.request_id), AudioReady)
    assert sorted(letter.key for letter in outcomes.dead_letters) == [b"", b"no-tenant"]
    assert {dict(letter.headers)["dlq.error.reason"] for letter in outcomes.dead_letters} == {
        b"invalid_record"
    }
    # Counted and logged as failed requests; only the two without ids as dead letters.
    answered = [
        entry
        for entry in logs
        if entry["event"] == "outcome_published" and entry.get("error_code") == "INVALID_REQUEST"
    ]
    assert sorted(entry["request_id"] for entry in answered) == sorted(
        i.request_id for i in invalid
    )
    assert len([entry for entry in logs if entry["event"] == "dead_letter"]) == 2
    assert scrape.value("voiceclone_requests_total", outcome="failed") == len(invalid)
    assert scrape.value("voiceclone_failures_total", error_code="INVALID_REQUEST") == len(invalid)
    assert scrape.value("voiceclone_requests_total", outcome="dead_letter") == 2
    assert scrape.value("voiceclone_dead_letters_total", reason="invalid_record") == 2
    await assert_all_committed(settings)
