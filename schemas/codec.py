"""Event codecs: events to Kafka record values and headers, and back.

Two wire formats share one interface (`Codec`) and one Avro core (`AvroCodec`):

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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from io import BytesIO
from typing import Final, Protocol

from fastavro import schemaless_reader, schemaless_writer
from fastavro.read import SchemaResolutionError
from pydantic import ValidationError

from schemas.errors import (
    DecodeReason,
    EncodeReason,
    EventCodecError,
    EventDecodeError,
    EventEncodeError,
)
from schemas.events import EVENT_TYPES, Event, event_types_by_topic
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
    "SchemalessCodec",
    "SchemalessForm",
    "make_codec",
]

FINGERPRINT_HEADER: Final = "voiceclone-schema"
EVENT_TYPE_HEADER: Final = "voiceclone-event-type"
FINGERPRINT_BYTES: Final = 8
# Avro's single-object encoding: these two bytes, the fingerprint, then the Avro binary body.
# A bare body of any of our schemas never starts with them: every record's first field is a
# string, and C3 01 would be its length as a negative varint (-98).
SINGLE_OBJECT_MARKER: Final = b"\xc3\x01"
SINGLE_OBJECT_PREFIX_BYTES: Final = len(SINGLE_OBJECT_MARKER) + FINGERPRINT_BYTES
# Far above any real event and Kafka's default message.max.bytes (1 MiB); bounds the work a
# hostile or corrupt value can cause.
DEFAULT_MAX_VALUE_BYTES: Final = 4 * 1024 * 1024

Header = tuple[str, bytes]
# Kafka header values may be null; decode tolerates any input.
InHeaders = Sequence[tuple[str, bytes | None]]


@dataclass(frozen=True, slots=True)
class Encoded:
    """A Kafka record value and the headers to send with it."""

    value: bytes
    headers: list[Header]


class Codec(Protocol):
    async def encode(self, topic: str, event: Event) -> Encoded:
        """Serialize `event` for `topic`; raises EventEncodeError."""
        ...

    async def decode(self, topic: str, value: bytes | None, headers: InHeaders) -> Event:
        """Deserialize a record read from `topic`; raises EventDecodeError, nothing else."""
        ...


def last_header(headers: InHeaders, name: str) -> bytes | None:
    """The value of the last header called `name` (Kafka allows repeats), if bytes-like."""
    for key, value in reversed(headers):
        if key == name:
            return bytes(value) if isinstance(value, bytes | bytearray | memoryview) else None
    return None


class AvroCodec:
    """What both wire formats share: routing, limits, Avro (de)serialization, validation.

    topics=None accepts every topic and takes the event type from the writer schema; with
    Topics, each topic must carry its own event type (TOPIC_EVENT_TYPES) in both directions.
    """

    def __init__(
        self,
        *,
        topics: Topics | None = None,
        store: SchemaStore | None = None,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
    ) -> None:
        self._store = store if store is not None else SchemaStore.shipped()
        self._routes: Mapping[str, type[Event]] | None = (
            event_types_by_topic(topics) if topics is not None else None
        )
        self._max_value_bytes = max_value_bytes
        # Per event type, computed once: the schema we write with and the type header.
        self._writers = {cls: self._store.reader(name) for name, cls in EVENT_TYPES.items()}
        self._type_headers = {
            cls: (EVENT_TYPE_HEADER, name.encode()) for name, cls in EVENT_TYPES.items()
        }

    # -- encoding -------------------------------------------------------------------------

    def _writer_for(self, topic: str, event: Event) -> WriterSchema:
        writer = self._writers.get(type(event))
        if writer is None:
            raise EventEncodeError(
                EncodeReason.INVALID_EVENT, f"{type(event).__name__} is not an event", topic=topic
            )
        if self._routes is not None:
            _check_route(self._routes, topic, event)
        return writer

    def _serialize(self, topic: str, writer: WriterSchema, event: Event, prefix: bytes) -> bytes:
        try:
            record = event.to_avro()
            # Validate what readers will validate, so we never publish a record they reject
            # (frozen models are valid unless built with model_construct).
            type(event).from_avro(record)
            buffer = BytesIO()
            buffer.write(prefix)
            schemaless_writer(buffer, writer.parsed, record)
        except Exception as exc:  # pydantic or fastavro: the event does not fit its schema
            raise EventEncodeError(
                EncodeReason.INVALID_EVENT,
                f"invalid {type(event).__name__}: {_describe(exc)}",
                topic=topic,
            ) from exc
        return buffer.getvalue()

    def _type_header(self, event: Event) -> Header:
        return self._type_headers[type(event)]

    # -- decoding -------------------------------------------------------------------------

    def _expected_type(self, topic: str) -> type[Event] | None:
        if self._routes is None:
            return None
        expected = self._routes.get(topic)
        if expected is None:
            raise EventDecodeError(DecodeReason.UNKNOWN_TOPIC, "not a known topic", topic=topic)
        return expected

    def _checked_value(self, topic: str, value: bytes | None) -> bytes:
        if not value:
            raise EventDecodeError(DecodeReason.EMPTY, "record has no value", topic=topic)
        if len(value) > self._max_value_bytes:
            raise EventDecodeError(
                DecodeReason.TOO_LARGE,
                f"value is {len(value)} bytes, over the {self._max_value_bytes} byte limit",
                topic=topic,
            )
        return value

    def _event_type_of(
        self, topic: str, writer: WriterSchema, expected: type[Event] | None
    ) -> type[Event]:
        event_type = EVENT_TYPES.get(writer.fullname)
        if event_type is None or (expected is not None and event_type is not expected):
            wanted = expected.__name__ if expected is not None else "an event"
            raise EventDecodeError(
                DecodeReason.WRONG_TYPE,
                f"expected {wanted}, got a {writer.fullname} record",
                topic=topic,
            )
        return event_type

    def _check_type_header(self, topic: str, writer: WriterSchema, headers: InHeaders) -> None:
        named = last_header(headers, EVENT_TYPE_HEADER)
        if named is not None and named != writer.fullname.encode():
            raise EventDecodeError(
                DecodeReason.BAD_HEADER,
                f"{EVENT_TYPE_HEADER} says {named!r} but the schema is {writer.fullname}",
                topic=topic,
            )

    def _deserialize(
        self,
        topic: str,
        writer: WriterSchema,
        value: bytes,
        offset: int,
        event_type: type[Event],
    ) -> Event:
        record = _read_record(topic, writer, value, offset)
        try:
            return event_type.from_avro(record)
        except Exception as exc:  # ValidationError, or anything a validator let through
            raise EventDecodeError(
                DecodeReason.INVALID_RECORD,
                f"invalid {event_type.__name__}: {_describe(exc)}",
                topic=topic,
                event_type=event_type,
                # What was read, for a reader to act on its valid parts; not after a defect.
                record=record if isinstance(exc, ValidationError) else None,
            ) from exc


def _describe(exc: Exception) -> str:
    """A short account of why an event is invalid, without echoing its (user) content."""
    if isinstance(exc, ValidationError):
        problems = exc.errors(include_url=False, include_input=False, include_context=False)
        return "; ".join(f"{'.'.join(map(str, p['loc'])) or '-'}: {p['msg']}" for p in problems)
    return repr(exc)


def _check_route(routes: Mapping[str, type[Event]], topic: str, event: Event) -> None:
    expected = routes.get(topic)
    if expected is None:
        raise EventEncodeError(EncodeReason.UNKNOWN_TOPIC, "not a known topic", topic=topic)
    if type(event) is not expected:
        raise EventEncodeError(
            EncodeReason.WRONG_TOPIC,
            f"topic carries {expected.__name__}, not {type(event).__name__}",
            topic=topic,
        )


def _read_record(topic: str, writer: WriterSchema, value: bytes, offset: int) -> object:
    """Read one Avro record at value[offset:], which it must span exactly."""
    buffer = BytesIO(value)
    buffer.seek(offset)
    try:
        record = schemaless_reader(buffer, writer.parsed, writer.resolve_into)
    except SchemaResolutionError as exc:
        raise EventDecodeError(
            DecodeReason.INCOMPATIBLE_SCHEMA,
            f"cannot read {writer.fullname} {writer.fingerprint.hex()} as ours: {exc}",
            topic=topic,
        ) from exc
    except Exception as exc:  # corrupt bytes make fastavro raise EOF/Index/Unicode/... errors
        raise EventDecodeError(
            DecodeReason.CORRUPT, f"not a {writer.fullname} record: {exc!r}", topic=topic
        ) from exc
    if buffer.tell() != len(value):
        raise EventDecodeError(
            DecodeReason.CORRUPT,
            f"{len(value) - buffer.tell()} bytes left after the {writer.fullname} record",
            topic=topic,
        )
    return record


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
