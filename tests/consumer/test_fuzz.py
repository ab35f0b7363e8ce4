"""Fuzzing what hostile input reaches first: the worker's decoder, the pipeline's checks before
any work, and the reference fetcher's URI checks. Each may only answer with its own error.

tests/schemas/test_decode_fuzz.py fuzzes both codecs routed by topic with byte edits; this adds
the codec as the worker builds it (`make_codec()`, no routing), bit flips, splices of records of
different types, every truncation and every single-bit flip of each sample (exhaustively);
then the pipeline's checks before any work, and the fetcher. About 20,000 inputs in all.
"""

import ipaddress
import socket
import string
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from consumer.admission import Deadline
from consumer.pipeline import check_request
from consumer.reference import (
    ReferenceFetcher,
    ReferenceFetchError,
    ReferenceSettings,
    is_public_address,
)
from consumer.settings import LimitSettings
from producer.storage import object_key
from schemas.codec import EVENT_TYPE_HEADER, FINGERPRINT_HEADER, Encoded
from schemas.errors import DecodeReason, EventDecodeError
from schemas.events import EVENT_TYPES, CloneRequest, Event
from schemas.topics import Topics
from schemas.vocabulary import VoicecloneError
from schemas.wire_format import make_codec
from tests.consumer.test_security import LocalDns
from tests.fixtures.worker import clone_request
from tests.schemas.samples import SAMPLE_IDS, SAMPLES
from tests.schemas.test_decode_fuzz import SEEDS as DECODE_FUZZ_SEEDS
from tests.schemas.test_decode_fuzz import SINGLE_OBJECT_SEEDS as DECODE_FUZZ_SINGLE_OBJECT_SEEDS

# deadline=None: a busy CI machine must not turn a slow example into a failure. No example
# database: CI starts clean, and the working tree stays so.
FUZZ = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
TOPIC = Topics().requests
CODEC = make_codec()  # as serve() builds it: any event type is read, the handler checks it
Headers = list[tuple[str, bytes | None]]
T = TypeVar("T")


# Every event type, full and minimal, in the older header form, and single-object encoded.
SEEDS = [record for _, record in DECODE_FUZZ_SEEDS]
SINGLE_OBJECT_SEEDS = [record for _, record in DECODE_FUZZ_SINGLE_OBJECT_SEEDS]
FINGERPRINTS = [dict(seed.headers)[FINGERPRINT_HEADER] for seed in SEEDS]


async def decode_or_typed_error(value: bytes | None, headers: Headers) -> str:
    """What the worker's decoder makes of a record, in a word: it must return a valid event
    or raise its one error."""
    try:
        decoded = await CODEC.decode(TOPIC, value, headers)
    except EventDecodeError as exc:
        return f"error: {exc.reason}"
    assert type(decoded).model_validate(decoded.model_dump()) == decoded
    return f"decoded {type(decoded).__name__}"


def mostly(usual: st.SearchStrategy[T], rare: st.SearchStrategy[T]) -> st.SearchStrategy[T]:
    """`usual` three times in four, else `rare` (a plain `|` would draw each half the time)."""
    return st.integers(0, 3).flatmap(lambda n: rare if n == 0 else usual)


# The decoder over anything


header_names = st.sampled_from([FINGERPRINT_HEADER, EVENT_TYPE_HEADER, "traceparent"]) | st.text(
    max_size=30
)
header_values = (
    st.none()
    | st.binary(max_size=32)
    | st.sampled_from(FINGERPRINTS)
    | st.sampled_from([name.encode() for name in EVENT_TYPES])
    | st.sampled_from(FINGERPRINTS).map(lambda fp: fp[:-1])
)
any_headers = st.lists(st.tuples(header_names, header_values), max_size=6)
values = mostly(st.binary(min_size=1, max_size=2048), st.sampled_from([None, b""]))


@st.composite
def headers_mostly_naming_a_schema(draw: st.DrawFn) -> Headers:
    """Any headers, most often with one of our fingerprints among them, so that arbitrary
    bytes get past the header check and into the Avro reader."""
    headers = draw(any_headers)
    if draw(st.integers(0, 3)):
        at = draw(st.integers(0, len(headers)))
        headers.insert(at, (FINGERPRINT_HEADER, draw(st.sampled_from(FINGERPRINTS))))
    return headers


@settings(FUZZ, max_examples=2500)
@given(value=values, headers=headers_mostly_naming_a_schema())
async def test_arbitrary_records_decode_or_raise_the_typed_error(
    value: bytes | None, headers: Headers
) -> None:
    event(await decode_or_typed_error(value, headers))  # --hypothesis-show-statistics


# Mutations of real records


def flip_bits(draw: st.DrawFn, value: bytes) -> bytes:
    out = bytearray(value)
    for _ in range(draw(st.integers(1, 8))):
        bit = draw(st.integers(0, len(out) * 8 - 1))
        out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def splice(draw: st.DrawFn, value: bytes) -> bytes:
    """The head of `value` joined to the tail of another record (maybe of another type)."""
    other = draw(st.sampled_from(SEEDS)).value
    return value[: draw(st.integers(0, len(value)))] + other[draw(st.integers(0, len(other))) :]


def truncate(draw: st.DrawFn, value: bytes) -> bytes:
    return value[: draw(st.integers(0, len(value)))]


@st.composite
def mutated_records(draw: st.DrawFn) -> tuple[bytes, Headers]:
    """A real record with bit flips, a truncation or a splice, under its own headers or
    another record's (so the bytes are read with the wrong schema too)."""
    seed = draw(st.sampled_from(SEEDS + SINGLE_OBJECT_SEEDS))
    mutate = draw(st.sampled_from([flip_bits, splice, truncate]))
    headers = draw(st.sampled_from([seed.headers, draw(st.sampled_from(SEEDS)).headers]))
    return mutate(draw, seed.value), list(headers)


@settings(FUZZ, max_examples=2500)
@given(record=mutated_records())
async def test_mutated_records_decode_validly_or_raise_the_typed_error(
    record: tuple[bytes, Headers],
) -> None:
    event(await decode_or_typed_error(*record))


@pytest.mark.parametrize(("seed", "sample"), list(zip(SEEDS, SAMPLES, strict=True)), ids=SAMPLE_IDS)
async def test_no_truncation_of_a_record_decodes(seed: Encoded, sample: tuple[str, Event]) -> None:
    # A record spans its value exactly, so every strict prefix must be refused.
    reasons = set()
    for size in range(len(seed.value)):
        with pytest.raises(EventDecodeError) as caught:
            await CODEC.decode(TOPIC, seed.value[:size], seed.headers)
        reasons.add(caught.value.reason)
    assert reasons <= {DecodeReason.EMPTY, DecodeReason.CORRUPT}
    assert await CODEC.decode(TOPIC, seed.value, seed.headers) == sample[1]


def single_bit_flips(value: bytes) -> Iterator[bytes]:
    for bit in range(len(value) * 8):
        out = bytearray(value)
        out[bit // 8] ^= 1 << (bit % 8)
        yield bytes(out)


@pytest.mark.parametrize("seed", SEEDS, ids=SAMPLE_IDS)
async def test_every_single_bit_flip_decodes_validly_or_raises_the_typed_error(
    seed: Encoded,
) -> None:
    for flipped in single_bit_flips(seed.value):
        await decode_or_typed_error(flipped, list(seed.headers))


# The pipeline's checks before any work

BASE_REQUEST = clone_request("https://voices.example.com/voice.wav")
LIMIT = LimitSettings(max_text_chars=64)
NOW = datetime.now(UTC)  # the deadline is read on the real clock: moments around the run's

ids = mostly(
    # The storage key alphabet, a little past its length limit: mostly safe ids.
    st.text(alphabet=string.ascii_letters + string.digits + "._-", min_size=1, max_size=130),
    st.text() | st.sampled_from(["", ".", "..", "../etc", "a/b", "\x00", "é" * 200, "r" * 129]),
)
texts = (
    st.text()
    | st.text(alphabet=" \t\n\r\x0b\x0c\x1c\x85\xa0\u2028\u3000\ufeff\u200b")
    | st.integers(LIMIT.max_text_chars - 2, LIMIT.max_text_chars + 2).map(lambda n: "é" * n)
)
offsets = st.timedeltas(min_value=-timedelta(hours=23, minutes=59), max_value=timedelta(hours=23))
deadlines = st.none() | st.builds(
    lambda moment, offset: moment.astimezone(timezone(offset)),
    st.datetimes(
        min_value=datetime(1971, 1, 1), max_value=datetime(9998, 1, 1), timezones=st.just(UTC)
    )
    | st.sampled_from([NOW, NOW - timedelta(microseconds=1), NOW + timedelta(microseconds=1)]),
    offsets,
)


def refusal(request: CloneRequest) -> VoicecloneError | None:
    """What the checks before any work make of `request`, in the pipeline's order."""
    try:
        check_request(request, LIMIT)
        Deadline.of(request.deadline).check()
    except VoicecloneError as exc:
        return exc
    return None


@settings(FUZZ, max_examples=3000)
@given(request_id=ids, tenant_id=ids, text=texts, deadline=deadlines)
def test_the_checks_before_work_return_or_raise_a_voiceclone_error(
    request_id: str, tenant_id: str, text: str, deadline: datetime | None
) -> None:
    # model_copy does not validate: the checks must cope with whatever decoding lets through.
    request = BASE_REQUEST.model_copy(
        update={
            "request_id": request_id,
            "tenant_id": tenant_id,
            "text": text,
            "deadline": deadline,
        }
    )
    refused = refusal(request)
    if refused is not None:
        event(f"refused: {refused.code}")
        assert not refused.transient  # the same request can never pass later
        return
    event("accepted")
    # What the checks promise the stages after them.
    assert text.strip()
    assert len(text) <= LIMIT.max_text_chars
    assert deadline is None or deadline > NOW
    object_key(tenant_id, request_id, "wav")  # raises InvalidKeyError for an unsafe id


# The reference fetcher's URI checks

PUBLIC_IP = "93.184.215.14"
hosts = st.sampled_from(
    [
        PUBLIC_IP, "127.0.0.1", "10.0.0.1", "169.254.169.254", "0.0.0.0", "[::1]", "[::]",
        "[::ffff:127.0.0.1]", "[64:ff9b::a9fe:a9fe]", "[fe80::1%25eth0]", "[2002:7f00:1::]",
        "2130706433", "0x7f.1", "127.1", "0177.0.0.1", "0", "localhost", "public.test",
        "internal.test", "mixed.test", "nowhere.test", "a" * 64 + ".test", "a..test", "",
    ]
)  # fmt: skip
schemes = mostly(
    st.sampled_from(["http", "https"]),
    st.sampled_from(["HTTPS", "file", "s3", "ftp", ""]) | st.text(max_size=6),
)
ports = st.none() | st.integers(-1, 70_000)


@st.composite
def uris(draw: st.DrawFn) -> str:
    """Mostly URIs shaped like a reference, with hostile parts; sometimes any text."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.text(max_size=60))
    userinfo = draw(st.sampled_from(["", "", "user:pw@", "@"]))
    port = draw(ports)
    path = draw(st.sampled_from(["/voice.wav", "/../x", "/%2e%2e/", ""]) | st.text(max_size=12))
    host = draw(mostly(hosts, st.text(max_size=20)))
    authority = f"{userinfo}{host}{'' if port is None else f':{port}'}"
    return f"{draw(schemes)}://{authority}{path}"


class Redirector:
    """A transport that answers whatever it is sent with the next redirect queued, then 404;
    it never connects anywhere, and keeps the URLs it was sent."""

    def __init__(self) -> None:
        self.locations: list[str] = []
        self.sent: list[httpx.URL] = []
        self.transport = httpx.MockTransport(self._answer)

    def _answer(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(request.url)
        if self.locations:
            # Raw bytes, as a server may send them: httpx only takes str headers in ASCII.
            location = self.locations.pop(0).encode("utf-8", "surrogatepass")
            return httpx.Response(302, headers=[(b"Location", location)])
        return httpx.Response(404)


@pytest.fixture
async def fetcher_and_redirector(
    tmp_path: Path,
) -> AsyncIterator[tuple[ReferenceFetcher, Redirector]]:
    redirector = Redirector()
    settings_ = ReferenceSettings(
        allowed_schemes=["http", "https", "file", "s3"], file_root=tmp_path, max_redirects=2
    )
    async with ReferenceFetcher(settings_, transport=redirector.transport) as fetcher:
        yield fetcher, redirector


@settings(FUZZ, max_examples=1500)
@given(
    # Half the time a public first hop, so that the redirects drawn are followed.
    uri=uris() | st.sampled_from([f"http://{PUBLIC_IP}/voice.wav", "https://public.test/a.wav"]),
    locations=st.lists(uris(), max_size=3),
)
async def test_fetcher_refuses_with_its_error_and_only_dials_public_addresses(
    fetcher_and_redirector: tuple[ReferenceFetcher, Redirector], uri: str, locations: list[str]
) -> None:
    fetcher, redirector = fetcher_and_redirector
    redirector.locations, redirector.sent = list(locations), []
    dns = LocalDns(
        {
            "public.test": [PUBLIC_IP],
            "internal.test": ["10.0.0.1"],
            "mixed.test": [PUBLIC_IP, "::1"],
        }
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket, "getaddrinfo", dns)
        with pytest.raises(ReferenceFetchError) as caught:  # nothing serves audio
            await fetcher.fetch(uri)
    event(f"refused: {caught.value.reason}")
    # Nothing here fails for want of trying again: a transient answer would be retried in vain.
    assert not caught.value.transient, caught.value
    for url in redirector.sent:
        assert is_public_address(ipaddress.ip_address(url.host)), url
        assert url.port is None or 0 < url.port < 65536, url
