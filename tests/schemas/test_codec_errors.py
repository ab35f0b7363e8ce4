"""Bad input raises the typed codec errors, with the right reason, in both wire formats."""

import io
import os
import uuid
from datetime import datetime
from typing import Any

import fastavro
import pytest

from schemas.codec import (
    AVRO_DIR,
    EVENT_TYPE_HEADER,
    FINGERPRINT_HEADER,
    HISTORY_DIR,
    SINGLE_OBJECT_MARKER,
    SINGLE_OBJECT_PREFIX_BYTES,
    Codec,
    Encoded,
    EventDecodeError,
    EventEncodeError,
    SchemalessCodec,
    SchemalessForm,
    SchemaStore,
    load_schema_file,
)
from schemas.errors import DecodeReason, EncodeReason, EventCodecError
from schemas.events import EVENT_TYPES, AudioReady, CloneCancel, CloneRequest
from schemas.topics import Topics
from schemas.wire_format import make_codec
from tests.schemas.fake_registry import FakeSchemaRegistry
from tests.schemas.pairs import CodecPair
from tests.schemas.samples import full_audio_ready, full_cancel, full_request, minimal_request
from tests.schemas.variants import registry_record, schemaless_record, shipped

TOPICS = Topics()
REQUESTS = TOPICS.requests


async def _decode_error(
    codec: Codec, value: bytes | None, headers: list, topic: str = REQUESTS
) -> EventDecodeError:
    with pytest.raises(EventDecodeError) as caught:
        await codec.decode(topic, value, headers)
    assert caught.value.topic == topic
    return caught.value


async def _valid(codecs: CodecPair) -> Encoded:
    return await codecs.writer.encode(REQUESTS, full_request())


@pytest.mark.parametrize("value", [None, b""])
async def test_empty_value(codecs: CodecPair, value: bytes | None) -> None:
    headers = (await _valid(codecs)).headers
    assert (await _decode_error(codecs.reader, value, headers)).reason == DecodeReason.EMPTY


async def test_random_bytes(codecs: CodecPair) -> None:
    encoded = await _valid(codecs)
    # A valid prefix (schema id, or single-object marker and fingerprint), then garbage.
    prefix = encoded.value[: 5 if codecs.mode == "registry" else SINGLE_OBJECT_PREFIX_BYTES]
    for seed in range(50):
        garbage = prefix + os.urandom(1 + seed * 7)
        error = await _decode_error(codecs.reader, garbage, encoded.headers)
        assert error.reason in {DecodeReason.CORRUPT, DecodeReason.INVALID_RECORD}


async def test_truncated(codecs: CodecPair) -> None:
    encoded = await _valid(codecs)
    for cut in range(1, len(encoded.value)):
        error = await _decode_error(codecs.reader, encoded.value[:cut], encoded.headers)
        if codecs.mode == "schemaless" and cut < len(SINGLE_OBJECT_MARKER):
            assert error.reason == DecodeReason.BAD_HEADER  # half a marker, no header
        else:
            assert error.reason in {DecodeReason.CORRUPT, DecodeReason.INVALID_RECORD}, cut


async def test_trailing_bytes(codecs: CodecPair) -> None:
    encoded = await _valid(codecs)
    error = await _decode_error(codecs.reader, encoded.value + b"\x00", encoded.headers)
    assert error.reason == DecodeReason.CORRUPT


async def test_too_large(codecs: CodecPair) -> None:
    encoded = await _valid(codecs)
    small = codecs.make(max_value_bytes=len(encoded.value) - 1)
    error = await _decode_error(small, encoded.value, encoded.headers)
    assert error.reason == DecodeReason.TOO_LARGE


async def test_another_event_types_bytes_on_a_topic(codecs: CodecPair) -> None:
    encoded = await codecs.writer.encode(TOPICS.audio_ready, full_audio_ready())
    error = await _decode_error(codecs.reader, encoded.value, encoded.headers, REQUESTS)
    assert error.reason == DecodeReason.WRONG_TYPE
    assert "CloneRequest" in str(error)


async def test_unknown_topic(codecs: CodecPair) -> None:
    encoded = await _valid(codecs)
    error = await _decode_error(codecs.reader, encoded.value, encoded.headers, "not.ours")
    assert error.reason == DecodeReason.UNKNOWN_TOPIC


async def _written(codecs: CodecPair, record: dict[str, Any]) -> Encoded:
    """`record` written with the shipped request schema, bypassing the models' checks."""
    if codecs.mode == "schemaless":
        return schemaless_record(shipped("clone_request"), record)
    schema_id = int.from_bytes((await _valid(codecs)).value[1:5], "big")
    return registry_record(schema_id, shipped("clone_request"), record)


async def test_invalid_record(codecs: CodecPair) -> None:
    """Well-formed Avro that breaks a model rule (a malformed checksum) is rejected on decode."""
    request = minimal_request().to_avro()
    voice = {**request["voice"], "reference_audio_sha256": "not-a-sha256"}
    encoded = await _written(codecs, {**request, "voice": voice})
    error = await _decode_error(codecs.reader, encoded.value, encoded.headers)
    assert error.reason == DecodeReason.INVALID_RECORD
    assert "reference_audio_sha256" in str(error)
    # What was read comes with the error, so the worker can answer the sender.
    assert error.event_type is CloneRequest
    assert error.record is not None
    assert error.record["voice"]["reference_audio_sha256"] == "not-a-sha256"


async def test_only_an_invalid_record_carries_what_was_read(codecs: CodecPair) -> None:
    encoded = await _valid(codecs)
    error = await _decode_error(codecs.reader, encoded.value[:-1], encoded.headers)
    assert (error.reason, error.event_type, error.record) == (DecodeReason.CORRUPT, None, None)


@pytest.mark.parametrize("field", ["request_id", "tenant_id"])
async def test_a_request_with_an_empty_id_is_invalid(codecs: CodecPair, field: str) -> None:
    """An answer to an empty id would reach nobody: such a request is not one."""
    encoded = await _written(codecs, {**minimal_request().to_avro(), field: ""})
    error = await _decode_error(codecs.reader, encoded.value, encoded.headers)
    assert error.reason == DecodeReason.INVALID_RECORD
    assert field in str(error)


@pytest.mark.parametrize("unsafe", ["..", "../etc/passwd", "a/b", "a\nb"])
async def test_a_request_with_an_unsafe_id_decodes(codecs: CodecPair, unsafe: str) -> None:
    """The worker refuses it with a clone-failed event (INVALID_REQUEST) that names the ids,
    instead of dead-lettering it: so decoding accepts it."""
    record = {**minimal_request().to_avro(), "request_id": unsafe, "tenant_id": unsafe}
    encoded = await _written(codecs, record)

    event = await codecs.reader.decode(REQUESTS, encoded.value, encoded.headers)

    assert isinstance(event, CloneRequest)
    assert (event.request_id, event.tenant_id) == (unsafe, unsafe)


# -- schemaless framing -----------------------------------------------------------------------


def _header_form() -> SchemalessCodec:
    return SchemalessCodec(form=SchemalessForm.HEADER, topics=TOPICS)


async def test_header_form_without_a_fingerprint_header() -> None:
    codec = _header_form()
    encoded = await codec.encode(REQUESTS, full_request())
    no_fingerprint = [h for h in encoded.headers if h[0] != FINGERPRINT_HEADER]
    for headers in (
        [],
        no_fingerprint,
        [(FINGERPRINT_HEADER, b"short")],
        [(FINGERPRINT_HEADER, None)],
    ):  # no marker and no usable header: neither form
        error = await _decode_error(codec, encoded.value, headers)
        assert error.reason == DecodeReason.BAD_HEADER
        assert "not the single-object marker c301" in str(error)
        assert f"no 8-byte {FINGERPRINT_HEADER} header" in str(error)


async def test_unknown_fingerprint() -> None:
    """In either form; the reason names the fingerprint and what to do about it."""
    unknown = b"\x01" * 8
    body = (await _header_form().encode(REQUESTS, full_request())).value
    for value, headers in (
        (body, [(FINGERPRINT_HEADER, unknown)]),
        (SINGLE_OBJECT_MARKER + unknown + body, []),
    ):
        error = await _decode_error(SchemalessCodec(topics=TOPICS), value, headers)
        assert error.reason == DecodeReason.UNKNOWN_SCHEMA
        assert unknown.hex() in str(error)
        assert "upgrade" in str(error)
        assert "extra schema" in str(error)


async def test_last_fingerprint_header_wins() -> None:
    codec = _header_form()
    encoded = await codec.encode(REQUESTS, full_request())
    headers = [(FINGERPRINT_HEADER, b"\x01" * 8), *encoded.headers]
    assert await codec.decode(REQUESTS, encoded.value, headers) == full_request()


@pytest.mark.parametrize("size", [2, 5, SINGLE_OBJECT_PREFIX_BYTES])
async def test_single_object_value_too_short(size: int) -> None:
    codec = SchemalessCodec(topics=TOPICS)
    encoded = await codec.encode(REQUESTS, full_request())
    error = await _decode_error(codec, encoded.value[:size], encoded.headers)
    assert error.reason == DecodeReason.CORRUPT
    assert "too short for single-object encoding" in str(error)


@pytest.mark.parametrize("marker", [b"\xc3\x02", b"\xc4\x01", b"\x00\x01"])
async def test_wrong_marker(marker: bytes) -> None:
    codec = SchemalessCodec(topics=TOPICS)
    encoded = await codec.encode(REQUESTS, full_request())
    error = await _decode_error(codec, marker + encoded.value[2:], encoded.headers)
    assert error.reason == DecodeReason.BAD_HEADER
    assert f"starts with {marker.hex()}, not the single-object marker" in str(error)


async def test_the_marker_wins_and_a_fingerprint_header_must_agree_with_it() -> None:
    codec = SchemalessCodec(topics=TOPICS)
    encoded = await codec.encode(REQUESTS, full_request())
    fingerprint = encoded.value[2:SINGLE_OBJECT_PREFIX_BYTES]
    agreeing = [(FINGERPRINT_HEADER, fingerprint), *encoded.headers]
    assert await codec.decode(REQUESTS, encoded.value, agreeing) == full_request()
    other = SchemaStore.shipped().reader(CloneCancel.avro_name).fingerprint
    error = await _decode_error(codec, encoded.value, [(FINGERPRINT_HEADER, other)])
    assert error.reason == DecodeReason.BAD_HEADER
    assert other.hex() in str(error)
    assert fingerprint.hex() in str(error)


def test_no_bare_body_starts_with_the_marker() -> None:
    """Why the marker decides the form: every record we ship (and every released version)
    starts with a string, whose length C3 01 would make negative (zigzag varint -98)."""
    assert fastavro.schemaless_reader(io.BytesIO(SINGLE_OBJECT_MARKER), "long") == -98
    schemas = [*AVRO_DIR.glob("*.avsc"), *HISTORY_DIR.glob("*.avsc")]
    assert len(schemas) >= 2 * len(EVENT_TYPES)
    for path in schemas:
        assert load_schema_file(path)["fields"][0]["type"] == "string", path


async def test_event_type_header_must_match_the_schema(codecs: CodecPair) -> None:
    encoded = await _valid(codecs)
    headers = [*encoded.headers, (EVENT_TYPE_HEADER, AudioReady.avro_name.encode())]
    error = await _decode_error(codecs.reader, encoded.value, headers)
    assert error.reason == DecodeReason.BAD_HEADER


async def test_fingerprint_of_another_event_type() -> None:
    codec = _header_form()
    request = await codec.encode(REQUESTS, full_request())
    cancel = await codec.encode(TOPICS.cancel, full_cancel())
    error = await _decode_error(codec, request.value, cancel.headers)
    assert error.reason == DecodeReason.WRONG_TYPE


# -- registry framing (on the real registry; the fake only where a fault must be injected) ----


async def test_wrong_magic_byte(schema_registry_url: str) -> None:
    codec = make_codec(schema_registry_url, topics=TOPICS)
    encoded = await codec.encode(REQUESTS, full_request())
    for magic in (1, 0x7F, 0xFF):
        error = await _decode_error(codec, bytes([magic]) + encoded.value[1:], encoded.headers)
        assert error.reason == DecodeReason.BAD_MAGIC


@pytest.mark.parametrize("value", [b"\x00", b"\x00\x00\x00\x00\x01"])
async def test_too_short_for_wire_format(schema_registry_url: str, value: bytes) -> None:
    error = await _decode_error(make_codec(schema_registry_url, topics=TOPICS), value, [])
    assert error.reason == DecodeReason.CORRUPT


async def test_unknown_schema_id(schema_registry_url: str) -> None:
    codec = make_codec(schema_registry_url, topics=TOPICS)
    encoded = await codec.encode(REQUESTS, full_request())
    value = b"\x00" + (2**31 - 5).to_bytes(4, "big") + encoded.value[5:]
    error = await _decode_error(codec, value, encoded.headers)
    assert error.reason == DecodeReason.UNKNOWN_SCHEMA
    assert not error.transient


async def test_schema_id_of_a_non_event_schema(schema_registry_url: str) -> None:
    from schema_registry.client import AsyncSchemaRegistryClient

    client = AsyncSchemaRegistryClient(schema_registry_url)
    other = {"type": "record", "name": "Other", "fields": [{"name": "x", "type": "long"}]}
    schema_id = await client.register(f"elsewhere-{uuid.uuid4().hex}-value", other)
    value = b"\x00" + schema_id.to_bytes(4, "big") + b"\x02"
    error = await _decode_error(make_codec(schema_registry_url, topics=TOPICS), value, [])
    assert error.reason == DecodeReason.WRONG_TYPE


async def test_registry_outage_is_retryable(registry: FakeSchemaRegistry) -> None:
    """A 503 from a registry that is up: only the fake can answer that on demand."""
    encoded = await make_codec(registry.url, topics=TOPICS).encode(REQUESTS, full_request())
    registry.fail_with = 503
    decode_error = await _decode_error(make_codec(registry.url, topics=TOPICS), encoded.value, [])
    assert decode_error.reason == DecodeReason.REGISTRY_UNAVAILABLE
    assert decode_error.transient
    with pytest.raises(EventEncodeError) as caught:
        await make_codec(registry.url, topics=TOPICS).encode(REQUESTS, full_request())
    assert caught.value.reason == EncodeReason.REGISTRY_UNAVAILABLE
    assert caught.value.transient


async def test_registry_down_is_retryable() -> None:
    codec = make_codec("http://127.0.0.1:9", topics=TOPICS)  # discard port: nothing listens
    with pytest.raises(EventEncodeError) as caught:
        await codec.encode(REQUESTS, full_request())
    assert caught.value.reason == EncodeReason.REGISTRY_UNAVAILABLE
    error = await _decode_error(codec, b"\x00\x00\x00\x00\x07\x02", [])
    assert error.reason == DecodeReason.REGISTRY_UNAVAILABLE


async def test_registry_rejecting_the_schema_is_not_retryable(registry: FakeSchemaRegistry) -> None:
    """Any schema refused: the fake's injected 409 (the real refusal is in
    test_registry_apicurio.py::test_evolution_through_registered_versions_both_ways)."""
    registry.fail_with = 409  # what a registry says to an incompatible schema
    with pytest.raises(EventEncodeError) as caught:
        await make_codec(registry.url, topics=TOPICS).encode(REQUESTS, full_request())
    assert caught.value.reason == EncodeReason.SCHEMA_REJECTED
    assert not caught.value.transient


# -- encoding ---------------------------------------------------------------------------------


async def test_encode_to_a_topic_of_another_event_type(codecs: CodecPair) -> None:
    with pytest.raises(EventEncodeError) as caught:
        await codecs.writer.encode(TOPICS.failed, full_request())
    assert caught.value.reason == EncodeReason.WRONG_TOPIC
    with pytest.raises(EventEncodeError) as caught:
        await codecs.writer.encode("not.ours", full_request())
    assert caught.value.reason == EncodeReason.UNKNOWN_TOPIC


@pytest.mark.parametrize(
    "changes",
    [
        {"created_at": datetime(2025, 1, 1)},  # naive: breaks a model rule, fine for Avro
        {"text": 42},  # wrong type
        {"language": "KLINGON"},  # not a symbol
        {"generation": {"top_k": 2**40}},  # not an Avro int
    ],
)
async def test_encode_invalid_event(codecs: CodecPair, changes: dict[str, object]) -> None:
    """Events built with model_construct skip validation; the codec still refuses them."""
    event = CloneRequest.model_construct(**{**dict(minimal_request()), **changes})
    with pytest.raises(EventEncodeError) as caught:
        await codecs.writer.encode(REQUESTS, event)
    assert caught.value.reason == EncodeReason.INVALID_EVENT
    assert not caught.value.transient


async def test_encode_something_that_is_not_an_event(codecs: CodecPair) -> None:
    with pytest.raises(EventEncodeError) as caught:
        await codecs.writer.encode(REQUESTS, object())  # type: ignore[arg-type]
    assert caught.value.reason == EncodeReason.INVALID_EVENT


def test_errors_share_a_base_and_read_well() -> None:
    error = EventDecodeError(DecodeReason.CORRUPT, "bad bytes", topic="t")
    assert isinstance(error, EventCodecError)
    assert issubclass(EventEncodeError, EventCodecError)
    assert str(error) == "bad bytes"
    assert error.reason == "corrupt"
    assert "corrupt" in repr(error)
    # Callers may raise it themselves with a plain string reason.
    assert EventDecodeError("wrong_type", "expected CloneRequest").reason == DecodeReason.WRONG_TYPE
