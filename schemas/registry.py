"""The Confluent Schema Registry codec.

Wire format: magic byte 0, the schema id as a 4-byte big-endian int, then the Avro binary.
Subjects follow TopicNameStrategy (`<topic>-value`). Schema ids are cached both ways, so the
registry is only asked once per subject (encode) and once per id (decode) per process.
"""

import asyncio
import struct
from typing import Final

from schema_registry.client import AsyncSchemaRegistryClient
from schema_registry.client.errors import ClientError

from schemas.codec import DEFAULT_MAX_VALUE_BYTES, AvroCodec, Encoded, InHeaders
from schemas.errors import DecodeReason, EncodeReason, EventDecodeError, EventEncodeError
from schemas.events import Event
from schemas.store import SchemaStore, WriterSchema
from schemas.topics import Topics

MAGIC_BYTE: Final = 0
_PREFIX: Final = struct.Struct(">BI")  # magic byte, schema id
AVRO_SCHEMA_TYPE: Final = "AVRO"


def subject_for(topic: str) -> str:
    """TopicNameStrategy: the subject of a topic's record values."""
    return f"{topic}-value"


def _encode_failure(exc: Exception, topic: str) -> EventEncodeError:
    # A 4xx is the registry refusing our schema; anything else is an outage worth retrying.
    code = exc.http_code if isinstance(exc, ClientError) else None
    if code is not None and 400 <= code < 500:
        return EventEncodeError(
            EncodeReason.SCHEMA_REJECTED,
            f"registry refused the schema for {subject_for(topic)}: {exc}",
            topic=topic,
        )
    return EventEncodeError(
        EncodeReason.REGISTRY_UNAVAILABLE, f"schema registry unavailable: {exc!r}", topic=topic
    )


class RegistryCodec(AvroCodec):
    """Confluent wire format; schemas registered and fetched via AsyncSchemaRegistryClient."""

    def __init__(
        self,
        client: AsyncSchemaRegistryClient,
        *,
        topics: Topics | None = None,
        store: SchemaStore | None = None,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
        auto_register: bool = True,
    ) -> None:
        super().__init__(topics=topics, store=store, max_value_bytes=max_value_bytes)
        self._client = client
        self._auto_register = auto_register
        self._prefixes: dict[str, bytes] = {}  # topic -> wire prefix carrying our schema id
        self._writers_by_id: dict[int, WriterSchema] = {}
        self._register_lock = asyncio.Lock()

    async def encode(self, topic: str, event: Event) -> Encoded:
        writer = self._writer_for(topic, event)
        prefix = self._prefixes.get(topic)
        if prefix is None:
            prefix = await self._prefix_for(topic, writer)
        value = self._serialize(topic, writer, event, prefix)
        return Encoded(value, [self._type_header(event)])

    async def decode(self, topic: str, value: bytes | None, headers: InHeaders) -> Event:
        expected = self._expected_type(topic)
        payload = self._checked_value(topic, value)
        schema_id = _schema_id(topic, payload)
        writer = self._writers_by_id.get(schema_id)
        if writer is None:
            writer = await self._fetch_writer(topic, schema_id)
        event_type = self._event_type_of(topic, writer, expected)
        self._check_type_header(topic, writer, headers)
        return self._deserialize(topic, writer, payload, _PREFIX.size, event_type)

    async def _prefix_for(self, topic: str, writer: WriterSchema) -> bytes:
        # One registry round trip per topic, even when the first encodes race.
        async with self._register_lock:
            prefix = self._prefixes.get(topic)
            if prefix is None:
                schema_id = await self._schema_id_for(topic, writer)
                prefix = self._prefixes[topic] = _PREFIX.pack(MAGIC_BYTE, schema_id)
            return prefix

    async def _schema_id_for(self, topic: str, writer: WriterSchema) -> int:
        subject = subject_for(topic)
        schema = dict(writer.raw)
        try:
            if self._auto_register:
                # The client looks the schema up first and only registers when it is new.
                return await self._client.register(subject, schema)
            found = await self._client.check_version(subject, schema)
        except Exception as exc:  # httpx transport errors, ClientError, bad responses
            raise _encode_failure(exc, topic) from exc
        if found is None:
            raise EventEncodeError(
                EncodeReason.UNKNOWN_SCHEMA,
                f"schema of {writer.fullname} is not registered under {subject}",
                topic=topic,
            )
        return found.schema_id

    async def _fetch_writer(self, topic: str, schema_id: int) -> WriterSchema:
        try:
            schema = await self._client.get_by_id(schema_id)
        except Exception as exc:  # httpx transport errors, ClientError, bad responses
            raise EventDecodeError(
                DecodeReason.REGISTRY_UNAVAILABLE,
                f"cannot fetch schema id {schema_id}: {exc!r}",
                topic=topic,
            ) from exc
        if schema is None or schema.schema_type != AVRO_SCHEMA_TYPE:
            raise EventDecodeError(
                DecodeReason.UNKNOWN_SCHEMA, f"no Avro schema with id {schema_id}", topic=topic
            )
        try:
            writer = self._store.resolve(schema.raw_schema)
        except ValueError as exc:
            raise EventDecodeError(
                DecodeReason.UNKNOWN_SCHEMA, f"schema id {schema_id}: {exc}", topic=topic
            ) from exc
        self._writers_by_id[schema_id] = writer
        return writer


def _schema_id(topic: str, value: bytes) -> int:
    if value[0] != MAGIC_BYTE:
        raise EventDecodeError(
            DecodeReason.BAD_MAGIC,
            f"first byte is {value[0]}, not the wire format's magic byte {MAGIC_BYTE}",
            topic=topic,
        )
    if len(value) <= _PREFIX.size:
        raise EventDecodeError(
            DecodeReason.CORRUPT,
            f"{len(value)} bytes is too short for the wire format",
            topic=topic,
        )
    return int.from_bytes(value[1 : _PREFIX.size], "big")
