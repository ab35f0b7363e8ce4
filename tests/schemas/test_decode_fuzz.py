"""Fuzz the decoders: whatever the value and headers, decode returns a valid event of the
topic's type or raises EventDecodeError. Nothing else may escape (no fastavro, struct,
pydantic or Unicode errors), and nothing may hang or allocate without bound."""

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from schema_registry.client import AsyncSchemaRegistryClient

from schemas.codec import EVENT_TYPE_HEADER, FINGERPRINT_HEADER, Codec, SchemalessCodec, SchemaStore
from schemas.errors import EventDecodeError
from schemas.events import EVENT_TYPES, Event, event_types_by_topic
from schemas.registry import subject_for
from schemas.topics import Topics
from schemas.wire_format import make_codec
from tests.schemas.samples import SAMPLES
from tests.schemas.variants import schemaless_record, shipped, single_object_record

TOPICS = Topics()
ROUTES = event_types_by_topic(TOPICS)
STEMS = {
    "requests": "clone_request",
    "audio_ready": "audio_ready",
    "failed": "clone_failed",
    "cancel": "clone_cancel",
}
# (topic, seed record) pairs: real records to mutate, so most inputs get past the framing
# and into the Avro reader and the model validation.
SEEDS = [
    (getattr(TOPICS, field), schemaless_record(shipped(STEMS[field]), event.to_avro()))
    for field, event in SAMPLES
]
# The same records single-object encoded, as our producers write them now.
SINGLE_OBJECT_SEEDS = [
    (getattr(TOPICS, field), single_object_record(shipped(STEMS[field]), event.to_avro()))
    for field, event in SAMPLES
]
FINGERPRINTS = [SchemaStore.shipped().reader(name).fingerprint for name in EVENT_TYPES]

# The codec fixtures are reused across examples on purpose: their caches don't change results.
FUZZ = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
Headers = list[tuple[str, bytes | None]]
Input = tuple[str, bytes | None, Headers]


def mutate(draw: st.DrawFn, value: bytes) -> bytes:
    """`value` with a few bytes changed, cut, or inserted."""
    out = bytearray(value)
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, len(out)))
        action = draw(st.sampled_from(["change", "cut", "insert"]))
        if action == "change" and at < len(out):
            out[at] = draw(st.integers(0, 255))
        elif action == "cut":
            del out[at : at + draw(st.integers(1, 16))]
        else:
            out[at:at] = draw(st.binary(min_size=1, max_size=16))
    return bytes(out)


header_names = st.sampled_from([FINGERPRINT_HEADER, EVENT_TYPE_HEADER, "traceparent"]) | st.text(
    max_size=20
)
header_values = (
    st.none()
    | st.binary(max_size=16)
    | st.sampled_from(FINGERPRINTS)
    | st.sampled_from([name.encode() for name in EVENT_TYPES])
)
any_headers = st.lists(st.tuples(header_names, header_values), max_size=4)
any_topic = st.sampled_from([*TOPICS.all(), "elsewhere"])
any_value = st.none() | st.binary(max_size=512)


@st.composite
def schemaless_inputs(draw: st.DrawFn) -> Input:
    """Mostly a mutated real record (either form) with its own topic and headers; sometimes
    anything."""
    topic, seed = draw(st.sampled_from(SEEDS + SINGLE_OBJECT_SEEDS))
    if draw(st.integers(0, 3)) == 0:
        return draw(any_topic), draw(any_value), draw(any_headers)
    return topic, mutate(draw, seed.value), seed.headers


@st.composite
def registry_inputs(draw: st.DrawFn, schema_ids: dict[str, int]) -> Input:
    """Mostly a mutated real record framed with its topic's schema id; sometimes anything.

    Unknown ids cost an HTTP round trip each, hence the bias towards known ones."""
    topic, seed = draw(st.sampled_from(SEEDS))
    if draw(st.integers(0, 3)) == 0:
        magic = draw(st.integers(0, 255))
        schema_id = draw(st.sampled_from(list(schema_ids.values())) | st.integers(0, 2**32 - 1))
        value = bytes([magic]) + schema_id.to_bytes(4, "big") + draw(st.binary(max_size=256))
        return draw(any_topic), draw(st.sampled_from([value, b"", b"\x00"])), draw(any_headers)
    framed = b"\x00" + schema_ids[topic].to_bytes(4, "big") + seed.value
    return topic, mutate(draw, framed), draw(st.just([]) | any_headers)


def check_decoded(topic: str, decoded: Event) -> None:
    """A successful decode must be a valid event of the topic's type."""
    assert type(decoded) is ROUTES[topic]
    assert type(decoded).model_validate(decoded.model_dump()) == decoded


@pytest.fixture
def schemaless() -> Codec:
    return SchemalessCodec(topics=TOPICS)


@pytest.fixture
async def registered(schema_registry_url: str) -> tuple[Codec, dict[str, int]]:
    """A registry codec on the real registry, and the schema id of each topic's schema
    (registered up front)."""
    client = AsyncSchemaRegistryClient(schema_registry_url)
    ids = {}
    for field, stem in STEMS.items():
        topic = getattr(TOPICS, field)
        ids[topic] = await client.register(subject_for(topic), shipped(stem))
    return make_codec(schema_registry_url, topics=TOPICS), ids


async def decode_or_typed_error(
    codec: Codec, topic: str, value: bytes | None, headers: Headers
) -> None:
    try:
        decoded = await codec.decode(topic, value, headers)
    except EventDecodeError as exc:
        event(f"error: {exc.reason}")  # --hypothesis-show-statistics shows the spread
        return
    event("decoded")
    check_decoded(topic, decoded)


@settings(FUZZ, max_examples=4000)
@given(data=st.data())
async def test_schemaless_decode_raises_only_the_typed_error(
    schemaless: Codec, data: st.DataObject
) -> None:
    await decode_or_typed_error(schemaless, *data.draw(schemaless_inputs()))


@settings(FUZZ, max_examples=1000)
@given(data=st.data())
async def test_registry_decode_raises_only_the_typed_error(
    registered: tuple[Codec, dict[str, int]], data: st.DataObject
) -> None:
    codec, schema_ids = registered
    await decode_or_typed_error(codec, *data.draw(registry_inputs(schema_ids)))


async def test_fuzz_seeds_decode(schemaless: Codec) -> None:
    """The unmutated seeds decode, so the fuzzer explores around real records."""
    for seeds in (SEEDS, SINGLE_OBJECT_SEEDS):
        for (topic, record), (_, sample) in zip(seeds, SAMPLES, strict=True):
            assert await schemaless.decode(topic, record.value, record.headers) == sample
