"""Event codecs: events to Kafka record values and headers, and back.

Two wire formats share one interface (`Codec`) and one Avro core (`AvroCodec`, both in
schemas/avro_codec.py):

- schemaless (default, no registry): Avro's single-object encoding (marker C3 01, the writer
  schema's 8-byte little-endian CRC-64-AVRO fingerprint, the Avro binary), or, as written
  before it, the bare Avro binary with that fingerprint in the `voiceclone-schema` header; the
  reader looks the fingerprint up in its SchemaStore;
- registry (schemas/registry.py): Confluent wire format, magic byte 0 + 4-byte schema id.

Both also send `voiceclone-event-type` (the Avro full name) so routers can filter without
decoding. Decoding reads the writer's bytes into our reader schema (Avro schema resolution),
then validates them as the pydantic event. Anything wrong with a record raises
EventDecodeError; nothing else escapes decode(), whatever the bytes.
"""

from enum import StrEnum
from typing import Final

from schemas.avro_codec import (
    DEFAULT_MAX_VALUE_BYTES,
    EVENT_TYPE_HEADER,
    AvroCodec,
    Codec,
    Encoded,
    Header,
    InHeaders,
    last_header,
)
from schemas.errors import DecodeReason, EventCodecError, EventDecodeError, EventEncodeError
from schemas.events import Event
from schemas.store import SchemaStore, WriterSchema
from schemas.topics import Topics

__all__ = [
    "DEFAULT_MAX_VALUE_BYTES",
    "EVENT_TYPE_HEADER",
    "FINGERPRINT_HEADER",
    "SINGLE_OBJECT_MARKER",
    "SINGLE_OBJECT_PREFIX_BYTES",
    "AvroCodec",
    "Codec",
    "Encoded",
    "EventCodecError",
    "EventDecodeError",
    "EventEncodeError",
    "Header",
    "InHeaders",
    "SchemalessCodec",
    "SchemalessForm",
    "make_codec",
]

FINGERPRINT_HEADER: Final = "voiceclone-schema"
FINGERPRINT_BYTES: Final = 8
# Avro's single-object encoding: these two bytes, the fingerprint, then the Avro binary body.
# A bare body of any of our schemas never starts with them: every record's first field is a
# string, and C3 01 would be its length as a negative varint (-98).
SINGLE_OBJECT_MARKER: Final = b"\xc3\x01"
SINGLE_OBJECT_PREFIX_BYTES: Final = len(SINGLE_OBJECT_MARKER) + FINGERPRINT_BYTES


class SchemalessForm(StrEnum):
    """How the schemaless codec writes (it reads both)."""

    SINGLE_OBJECT = "single_object"  # Avro single-object encoding
    HEADER = "header"  # bare Avro binary, fingerprint in FINGERPRINT_HEADER (the older form)


class SchemalessCodec(AvroCodec):
    """Records that name their writer schema by fingerprint, in either SchemalessForm.

    Decoding: a value that starts with SINGLE_OBJECT_MARKER is single-object encoded (a
    FINGERPRINT_HEADER sent with it must agree); any other value is a bare body and needs the
    header.
    """

    def __init__(
        self,
        *,
        form: SchemalessForm = SchemalessForm.SINGLE_OBJECT,
        topics: Topics | None = None,
        store: SchemaStore | None = None,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
    ) -> None:
        super().__init__(topics=topics, store=store, max_value_bytes=max_value_bytes)
        self._form = form

    async def encode(self, topic: str, event: Event) -> Encoded:
        writer = self._writer_for(topic, event)
        if self._form is SchemalessForm.SINGLE_OBJECT:
            prefix = SINGLE_OBJECT_MARKER + writer.fingerprint
            value = self._serialize(topic, writer, event, prefix)
            return Encoded(value, [self._type_header(event)])
        value = self._serialize(topic, writer, event, b"")
        return Encoded(value, [(FINGERPRINT_HEADER, writer.fingerprint), self._type_header(event)])

    async def decode(self, topic: str, value: bytes | None, headers: InHeaders) -> Event:
        expected = self._expected_type(topic)
        payload = self._checked_value(topic, value)
        fingerprint, offset = _fingerprint_of(topic, payload, headers)
        writer = self._known_writer(topic, fingerprint)
        event_type = self._event_type_of(topic, writer, expected)
        self._check_type_header(topic, writer, headers)
        return self._deserialize(topic, writer, payload, offset, event_type)

    def _known_writer(self, topic: str, fingerprint: bytes) -> WriterSchema:
        writer = self._store.get(fingerprint)
        if writer is None:
            raise EventDecodeError(
                DecodeReason.UNKNOWN_SCHEMA,
                f"unknown writer schema fingerprint {fingerprint.hex()}: this reader knows only "
                "the schemas it ships and any extra schemas it was given; upgrade it, give it "
                "the writer's .avsc as an extra schema, or use a Schema Registry",
                topic=topic,
            )
        return writer


def _fingerprint_of(topic: str, value: bytes, headers: InHeaders) -> tuple[bytes, int]:
    """The writer schema's fingerprint, and where the Avro body starts in `value`."""
    header = last_header(headers, FINGERPRINT_HEADER)
    if value.startswith(SINGLE_OBJECT_MARKER):
        if len(value) <= SINGLE_OBJECT_PREFIX_BYTES:
            raise EventDecodeError(
                DecodeReason.CORRUPT,
                f"{len(value)} bytes is too short for single-object encoding (marker "
                f"{SINGLE_OBJECT_MARKER.hex()}, {FINGERPRINT_BYTES}-byte fingerprint, body)",
                topic=topic,
            )
        fingerprint = value[len(SINGLE_OBJECT_MARKER) : SINGLE_OBJECT_PREFIX_BYTES]
        if header is not None and header != fingerprint:
            raise EventDecodeError(
                DecodeReason.BAD_HEADER,
                f"{FINGERPRINT_HEADER} header {header.hex()} contradicts the single-object "
                f"fingerprint {fingerprint.hex()}",
                topic=topic,
            )
        return fingerprint, SINGLE_OBJECT_PREFIX_BYTES
    if header is None or len(header) != FINGERPRINT_BYTES:
        raise EventDecodeError(
            DecodeReason.BAD_HEADER,
            f"value starts with {value[:2].hex()}, not the single-object marker "
            f"{SINGLE_OBJECT_MARKER.hex()}, and has no {FINGERPRINT_BYTES}-byte "
            f"{FINGERPRINT_HEADER} header",
            topic=topic,
        )
    return header, 0


def make_codec(
    schema_registry_url: str | None = None,
    *,
    form: SchemalessForm = SchemalessForm.SINGLE_OBJECT,
    topics: Topics | None = None,
    store: SchemaStore | None = None,
    max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
    auto_register: bool = True,
) -> Codec:
    """A registry codec when a registry URL is given, else the schemaless one.

    form only applies to the schemaless codec: how it writes. auto_register only applies to the
    registry: when False, encode looks schemas up but never registers them (for registries only
    CI may write to).
    """
    if not schema_registry_url:
        return SchemalessCodec(
            form=form, topics=topics, store=store, max_value_bytes=max_value_bytes
        )
    # Imported here so schemaless deployments never load the registry client and its deps.
    from schema_registry.client import AsyncSchemaRegistryClient

    from schemas.registry import RegistryCodec

    return RegistryCodec(
        AsyncSchemaRegistryClient(schema_registry_url),
        topics=topics,
        store=store,
        max_value_bytes=max_value_bytes,
        auto_register=auto_register,
    )
