"""Every event survives encode -> decode in both wire formats, and the wire is what we claim."""

import asyncio
import io
import json
from datetime import UTC, datetime, timedelta, timezone

import fastavro
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from producer.settings import ClientSettings
from schemas.codec import (
    AVRO_DIR,
    EVENT_TYPE_HEADER,
    FINGERPRINT_HEADER,
    SINGLE_OBJECT_MARKER,
    SchemalessCodec,
    SchemalessForm,
    SchemaStore,
    load_schema_file,
)
from schemas.events import CloneRequest, Event
from schemas.registry import RegistryCodec, subject_for
from schemas.topics import Topics
from schemas.wire_format import make_codec
from tests.schemas.fake_registry import FakeSchemaRegistry
from tests.schemas.pairs import CodecPair
from tests.schemas.samples import SAMPLE_IDS, SAMPLES, full_request, minimal_request


@pytest.mark.parametrize(("topic_field", "event"), SAMPLES, ids=SAMPLE_IDS)
async def test_round_trip(
    codecs: CodecPair, topics: Topics, topic_field: str, event: Event
) -> None:
    topic = getattr(topics, topic_field)
    encoded = await codecs.writer.encode(topic, event)
    decoded = await codecs.reader.decode(topic, encoded.value, encoded.headers)
    assert type(decoded) is type(event)
    assert decoded == event
    assert (EVENT_TYPE_HEADER, event.avro_name.encode()) in encoded.headers


async def test_round_trip_keeps_nulls_and_empty_values(codecs: CodecPair, topics: Topics) -> None:
    event = minimal_request()
    encoded = await codecs.writer.encode(topics.requests, event)
    decoded = await codecs.reader.decode(topics.requests, encoded.value, encoded.headers)
    assert isinstance(decoded, CloneRequest)
    assert decoded.metadata == {}
    assert decoded.text == ""
    assert decoded.generation is None
    assert decoded.deadline is None
    assert decoded.voice.reference_text is None


async def test_timestamps_come_back_utc_to_the_millisecond(codecs: CodecPair) -> None:
    local = datetime(2025, 1, 2, 3, 4, 5, 678999, tzinfo=timezone(timedelta(hours=5, minutes=30)))
    event = CloneRequest.model_validate({**minimal_request().model_dump(), "created_at": local})
    encoded = await codecs.writer.encode("voice.clone.requests", event)
    decoded = await codecs.reader.decode("voice.clone.requests", encoded.value, encoded.headers)
    assert decoded.created_at == datetime(2025, 1, 1, 21, 34, 5, 678000, tzinfo=UTC)
    assert decoded.created_at.utcoffset() == timedelta(0)


async def test_dlq_carries_requests_byte_for_byte(codecs: CodecPair, topics: Topics) -> None:
    """The worker copies requests it gives up on to the DLQ unchanged; replay tools read them."""
    encoded = await codecs.writer.encode(topics.requests, full_request())
    assert await codecs.reader.decode(topics.dlq, encoded.value, encoded.headers) == full_request()


@pytest.mark.parametrize(("topic_field", "event"), SAMPLES, ids=SAMPLE_IDS)
async def test_without_topics_any_topic_works(
    registry: FakeSchemaRegistry, topic_field: str, event: Event
) -> None:
    """make_codec(url) alone: the event type comes from the writer schema, topics are free."""
    for url in (None, registry.url):
        writer, reader = make_codec(url), make_codec(url)
        encoded = await writer.encode("anything.at.all", event)
        assert await reader.decode("some.other.topic", encoded.value, encoded.headers) == event


async def test_schemaless_wire_is_avro_single_object_encoding() -> None:
    codec = SchemalessCodec(topics=Topics())
    encoded = await codec.encode("voice.clone.requests", full_request())

    assert encoded.headers == [(EVENT_TYPE_HEADER, b"io.voiceclone.events.CloneRequest")]
    # Marker C3 01, then CRC-64-AVRO of the canonical form as 8 little-endian bytes (the order
    # of fastavro's hex string), then the body any Avro library reads with the .avsc alone.
    parsed = fastavro.parse_schema(load_schema_file(AVRO_DIR / "clone_request.avsc"))
    canonical = fastavro.schema.to_parsing_canonical_form(parsed)
    # Avro's own test vector pins that byte order: "int" -> 8f 5c 39 3f 1a d5 75 72.
    assert fastavro.schema.fingerprint('"int"', "CRC-64-AVRO") == "8f5c393f1ad57572"
    prefix = b"\xc3\x01" + bytes.fromhex(fastavro.schema.fingerprint(canonical, "CRC-64-AVRO"))
    assert encoded.value[:10] == prefix
    record = fastavro.schemaless_reader(io.BytesIO(encoded.value[10:]), parsed)
    assert CloneRequest.from_avro(record) == full_request()


async def test_header_form_is_bare_avro_plus_fingerprint_header() -> None:
    codec = SchemalessCodec(form=SchemalessForm.HEADER, topics=Topics())
    encoded = await codec.encode("voice.clone.requests", full_request())
    shipped = SchemaStore.shipped().reader(CloneRequest.avro_name)

    assert encoded.headers == [
        (FINGERPRINT_HEADER, shipped.fingerprint),
        (EVENT_TYPE_HEADER, b"io.voiceclone.events.CloneRequest"),
    ]
    parsed = fastavro.parse_schema(load_schema_file(AVRO_DIR / "clone_request.avsc"))
    record = fastavro.schemaless_reader(io.BytesIO(encoded.value), parsed)
    assert CloneRequest.from_avro(record) == full_request()


@pytest.mark.parametrize(("topic_field", "event"), SAMPLES, ids=SAMPLE_IDS)
async def test_a_single_object_reader_reads_the_header_form(
    topics: Topics, topic_field: str, event: Event
) -> None:
    """What writers before single-object encoding sent stays readable."""
    topic = getattr(topics, topic_field)
    encoded = await SchemalessCodec(form=SchemalessForm.HEADER, topics=topics).encode(topic, event)
    assert (
        await SchemalessCodec(topics=topics).decode(topic, encoded.value, encoded.headers) == event
    )


async def test_registry_wire_is_confluent_format(registry: FakeSchemaRegistry) -> None:
    codec = make_codec(registry.url, topics=Topics())
    encoded = await codec.encode("voice.clone.requests", full_request())

    [schema_id] = registry.subjects[subject_for("voice.clone.requests")]
    assert subject_for("voice.clone.requests") == "voice.clone.requests-value"
    assert encoded.value[0] == 0
    assert int.from_bytes(encoded.value[1:5], "big") == schema_id
    registered = json.loads(registry.schemas[schema_id])
    assert registered == load_schema_file(AVRO_DIR / "clone_request.avsc")
    record = fastavro.schemaless_reader(
        io.BytesIO(encoded.value[5:]), fastavro.parse_schema(registered)
    )
    assert CloneRequest.from_avro(record) == full_request()
    assert encoded.headers == [(EVENT_TYPE_HEADER, b"io.voiceclone.events.CloneRequest")]


async def test_registry_is_asked_once_per_subject_and_id(registry: FakeSchemaRegistry) -> None:
    writer = make_codec(registry.url, topics=Topics())
    reader = make_codec(registry.url, topics=Topics())
    values = [(await writer.encode("voice.clone.requests", full_request())) for _ in range(50)]
    for encoded in values:
        await reader.decode("voice.clone.requests", encoded.value, encoded.headers)

    assert registry.count("POST", "/subjects/voice.clone.requests-value/versions") == 1
    assert registry.count("POST", "/subjects/") == 2  # one lookup, then one registration
    assert registry.count("GET", "/schemas/ids/") == 1


async def test_concurrent_first_encodes_register_once(registry: FakeSchemaRegistry) -> None:
    writer = make_codec(registry.url)
    await asyncio.gather(
        *(writer.encode("voice.clone.requests", full_request()) for _ in range(20))
    )
    assert registry.count("POST", "/subjects/voice.clone.requests-value/versions") == 1


async def test_second_producer_finds_the_existing_registration(
    registry: FakeSchemaRegistry,
) -> None:
    first = await make_codec(registry.url).encode("voice.clone.requests", full_request())
    second = await make_codec(registry.url).encode("voice.clone.requests", full_request())
    assert first.value[:5] == second.value[:5]
    assert registry.count("POST", "/subjects/voice.clone.requests-value/versions") == 1


async def test_registry_lookup_only_mode_uses_existing_ids(registry: FakeSchemaRegistry) -> None:
    await make_codec(registry.url).encode("voice.clone.requests", full_request())  # "CI" registers
    registry.requests.clear()
    codec = make_codec(registry.url, auto_register=False)
    assert isinstance(codec, RegistryCodec)
    await codec.encode("voice.clone.requests", full_request())
    assert registry.count("POST", "/subjects/voice.clone.requests-value/versions") == 0
    assert registry.count("POST", "/subjects/voice.clone.requests-value") == 1


_ids = st.from_regex(r"\A[A-Za-z0-9._-]{1,128}\Z").filter(lambda s: s not in {".", ".."})


_SCHEMALESS = SchemalessCodec(topics=Topics())


@settings(max_examples=300, deadline=None)
@given(
    request_id=_ids,
    tenant_id=_ids,
    text=st.text(),
    metadata=st.dictionaries(st.text(), st.text(), max_size=5),
    seed=st.none() | st.integers(min_value=-(2**63), max_value=2**63 - 1),
    temperature=st.none() | st.floats(allow_nan=False, allow_infinity=False),
)
async def test_round_trip_any_request(
    request_id: str,
    tenant_id: str,
    text: str,
    metadata: dict[str, str],
    seed: int | None,
    temperature: float | None,
) -> None:
    event = CloneRequest.model_validate(
        {
            **minimal_request().model_dump(),
            "request_id": request_id,
            "tenant_id": tenant_id,
            "text": text,
            "metadata": metadata,
            "generation": {"seed": seed, "temperature": temperature},
        }
    )
    encoded = await _SCHEMALESS.encode("voice.clone.requests", event)
    assert await _SCHEMALESS.decode("voice.clone.requests", encoded.value, encoded.headers) == event


@pytest.mark.parametrize(
    ("form", "header_names"),
    [
        ("single_object", [EVENT_TYPE_HEADER]),
        ("header", [FINGERPRINT_HEADER, EVENT_TYPE_HEADER]),
    ],
)
async def test_the_settings_choose_the_form_producers_write(
    form: str, header_names: list[str]
) -> None:
    codec = ClientSettings(schemaless_form=form).make_codec()
    encoded = await codec.encode("voice.clone.requests", full_request())
    assert [name for name, _ in encoded.headers] == header_names
    assert encoded.value.startswith(SINGLE_OBJECT_MARKER) == (form == "single_object")
