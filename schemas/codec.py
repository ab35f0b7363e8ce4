"""The per-record codec: events to Kafka record values and headers, and back.

Two wire formats share one interface (`Codec`) and one Avro core (`AvroCodec`):

- schemaless (default, no registry, `SchemalessCodec`): Avro's single-object encoding (marker
  C3 01, the writer schema's 8-byte little-endian CRC-64-AVRO fingerprint, the Avro binary), or,
  as written before it, the bare Avro binary with that fingerprint in the `voiceclone-schema`
  header; the reader looks the fingerprint up in its SchemaStore;
- registry (schemas/registry.py, built on this module): Confluent wire format, magic byte 0 +
  4-byte schema id.

`make_codec` (schemas/wire_format.py) picks one of the two at start. Both also send
`voiceclone-event-type` (the Avro full name) so routers can filter without decoding. Decoding
reads the writer's bytes into our reader schema (Avro schema resolution), then validates them as
the pydantic event. Anything wrong with a record raises EventDecodeError; nothing else escapes
decode(), whatever the bytes.

Schemas are parsed once, by the SchemaStore (our reader schemas, and every writer schema we can
resolve from them); codecs only look them up. Each writer schema is identified by the
CRC-64-AVRO (Rabin) fingerprint of its Parsing Canonical Form, as 8 little-endian bytes (the
same fingerprint Avro's single-object encoding uses).
"""

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from io import BytesIO
from pathlib import Path
from typing import Any, Final, Protocol, cast

import fastavro
from fastavro import schemaless_reader, schemaless_writer
from fastavro.read import SchemaResolutionError
from fastavro.schema import fingerprint as _fingerprint_hex
from fastavro.schema import to_parsing_canonical_form
from pydantic import ValidationError

from schemas.errors import (
    DecodeReason,
    EncodeReason,
    EventCodecError,
    EventDecodeError,
    EventEncodeError,
    InvalidSchemaError,
)
from schemas.events import EVENT_TYPES, Event, event_types_by_topic
from schemas.topics import Topics

__all__ = [
    "AVRO_DIR",
    "DEFAULT_MAX_VALUE_BYTES",
    "EVENT_TYPE_HEADER",
    "FINGERPRINT_HEADER",
    "HISTORY_DIR",
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
    "RawSchema",
    "SchemaStore",
    "SchemalessCodec",
    "SchemalessForm",
    "WriterSchema",
    "last_header",
    "load_schema_file",
    "schema_fingerprint",
]

FINGERPRINT_HEADER: Final = "voiceclone-schema"
FINGERPRINT_BYTES: Final = 8
# Avro's single-object encoding: these two bytes, the fingerprint, then the Avro binary body.
# A bare body of any of our schemas never starts with them: every record's first field is a
# string, and C3 01 would be its length as a negative varint (-98).
SINGLE_OBJECT_MARKER: Final = b"\xc3\x01"
SINGLE_OBJECT_PREFIX_BYTES: Final = len(SINGLE_OBJECT_MARKER) + FINGERPRINT_BYTES
EVENT_TYPE_HEADER: Final = "voiceclone-event-type"
# Far above any real event and Kafka's default message.max.bytes (1 MiB); bounds the work a
# hostile or corrupt value can cause.
DEFAULT_MAX_VALUE_BYTES: Final = 4 * 1024 * 1024

AVRO_DIR: Final = Path(__file__).parent / "avro"
# Every released version of every schema, kept so readers still know the fingerprints of
# records written before an upgrade (see history/README.md).
HISTORY_DIR: Final = AVRO_DIR / "history"

# -- the known writer schemas --------------------------------------------------------------------

RawSchema = Mapping[str, Any]


@dataclass(frozen=True, slots=True, eq=False)
class WriterSchema:
    """A schema records were written with, ready to read them into our reader schema."""

    fullname: str
    fingerprint: bytes
    raw: RawSchema  # the schema JSON as shipped or registered
    parsed: dict[str, Any]  # fastavro-parsed; also what encoders write with
    # Our parsed reader schema of the same name when it differs from this one, else None:
    # None makes fastavro skip schema resolution.
    resolve_into: dict[str, Any] | None


def schema_fingerprint(parsed: dict[str, Any]) -> bytes:
    """CRC-64-AVRO fingerprint of a parsed schema's Parsing Canonical Form (8 bytes)."""
    canonical = to_parsing_canonical_form(parsed)
    return bytes.fromhex(_fingerprint_hex(canonical, "CRC-64-AVRO"))


def load_schema_file(path: Path) -> dict[str, Any]:
    """The JSON of one .avsc file. Each file is self-contained (no external type references)."""
    return json.loads(path.read_text(encoding="utf-8"))


def _parse(raw: RawSchema | str) -> tuple[RawSchema, dict[str, Any], str]:
    """Parse a record schema on its own (no shared named types); returns raw, parsed, name."""
    try:
        # fastavro reads dicts (and strings, lists), not every Mapping.
        schema = json.loads(raw) if isinstance(raw, str) else dict(raw)
        # A fresh named-types table per schema: variants of one record must not clash.
        parsed = fastavro.parse_schema(schema, named_schemas={})
    except Exception as exc:  # fastavro raises many types for bad schemas
        raise InvalidSchemaError(f"not a valid Avro schema: {exc}") from exc
    if not isinstance(parsed, dict) or parsed.get("type") != "record":
        raise InvalidSchemaError("not an Avro record schema")
    return schema, parsed, parsed["name"]


class SchemaStore:
    """Reader schemas (one per record name) plus known writer schemas by fingerprint."""

    def __init__(self, readers: Iterable[RawSchema | str]) -> None:
        self._readers: dict[str, WriterSchema] = {}
        self._by_fingerprint: dict[bytes, WriterSchema] = {}
        for raw in readers:
            schema, parsed, name = _parse(raw)
            reader = WriterSchema(name, schema_fingerprint(parsed), schema, parsed, None)
            self._readers[name] = reader
            self._by_fingerprint[reader.fingerprint] = reader

    @classmethod
    def shipped(cls, extra_dir: Path | None = None) -> "SchemaStore":
        """A store of the .avsc files in schemas/avro/, knowing every released version, plus
        the writer schemas in `extra_dir` (e.g. a newer release's, so its records are readable
        before this reader is upgraded)."""
        store = cls(load_schema_file(path) for path in sorted(AVRO_DIR.glob("*.avsc")))
        for path in sorted(HISTORY_DIR.glob("*.avsc")):
            store.add(load_schema_file(path))
        if extra_dir is not None:
            for path in sorted(extra_dir.glob("*.avsc")):
                store.add_file(path)
        return store

    @property
    def reader_names(self) -> frozenset[str]:
        return frozenset(self._readers)

    def reader(self, fullname: str) -> WriterSchema:
        """Our current schema for a record name; encoders write with it."""
        return self._readers[fullname]

    def get(self, fingerprint: bytes) -> WriterSchema | None:
        """A known writer schema by fingerprint, or None."""
        return self._by_fingerprint.get(fingerprint)

    def resolve(self, raw: RawSchema | str) -> WriterSchema:
        """The WriterSchema for a schema, without remembering it (e.g. one from a registry)."""
        schema, parsed, name = _parse(raw)
        fingerprint = schema_fingerprint(parsed)
        known = self._by_fingerprint.get(fingerprint)
        if known is not None:
            return known
        reader = self._readers.get(name)
        resolve_into = reader.parsed if reader is not None else None
        return WriterSchema(name, fingerprint, schema, parsed, resolve_into)

    def add_file(self, path: Path) -> WriterSchema:
        """Remember the writer schema in an .avsc file, which must be a version of one of our
        records: a stray file fails here, at start, not as wrong_type on every record."""
        try:
            writer = self.resolve(load_schema_file(path))
        except (OSError, ValueError) as exc:  # JSONDecodeError, InvalidSchemaError
            raise InvalidSchemaError(f"{path}: {exc}") from exc
        if writer.fullname not in self._readers:
            raise InvalidSchemaError(
                f"{path}: {writer.fullname} is not one of {', '.join(sorted(self._readers))}"
            )
        return self.add(writer.raw)

    def add(self, raw: RawSchema | str) -> WriterSchema:
        """Remember another writer schema (an older or newer version of one of ours)."""
        writer = self.resolve(raw)
        self._by_fingerprint.setdefault(writer.fingerprint, writer)
        return writer


# -- the interface ------------------------------------------------------------------------------

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


# -- the Avro core both wire formats build on ---------------------------------------------------


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


def _read_record(topic: str, writer: WriterSchema, value: bytes, offset: int) -> Mapping[str, Any]:
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
    return cast("dict[str, Any]", record)  # what fastavro reads with a record schema


# -- the schemaless wire format -----------------------------------------------------------------


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
