"""What both wire formats share: the `Codec` interface, and `AvroCodec`, the Avro core each
format's codec builds on (routing, limits, Avro (de)serialization, validation).

Its own module so that the two formats, `codec.py` (schemaless, and `make_codec`, which picks a
format) and `registry.py` (the Schema Registry's), each import it rather than each other.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import Any, Final, Protocol, cast

from fastavro import schemaless_reader, schemaless_writer
from fastavro.read import SchemaResolutionError
from pydantic import ValidationError

from schemas.errors import DecodeReason, EncodeReason, EventDecodeError, EventEncodeError
from schemas.events import EVENT_TYPES, Event, event_types_by_topic
from schemas.store import SchemaStore, WriterSchema
from schemas.topics import Topics

EVENT_TYPE_HEADER: Final = "voiceclone-event-type"
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
