"""The Confluent Schema Registry codec, on the Avro core of schemas/codec.py.

Wire format: magic byte 0, the schema id as a 4-byte big-endian int, then the Avro binary.
Subjects follow TopicNameStrategy (`<topic>-value`). Schema ids are cached both ways, so the
registry is only asked once per subject (encode) and once per id (decode) per process.

Schemas are looked up and registered with `normalize=true`: a registry then compares them in
canonical form, so a schema whose `doc` strings were edited since it was registered is still
found under its registered version (without it, Apicurio and Confluent compare the text and a
lookup-only writer would fail with unknown_schema after a doc-only edit).
"""

import asyncio
import json
import struct
from typing import Any, Final

from schema_registry.client import AsyncSchemaRegistryClient
from schema_registry.client.errors import ClientError

from schemas.codec import (
    DEFAULT_MAX_VALUE_BYTES,
    AvroCodec,
    Encoded,
    InHeaders,
    RawSchema,
    SchemaStore,
    WriterSchema,
)
from schemas.errors import DecodeReason, EncodeReason, EventDecodeError, EventEncodeError
from schemas.events import Event
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


def _schema_body(schema: RawSchema) -> dict[str, Any]:
    return {"schema": json.dumps(schema), "schemaType": AVRO_SCHEMA_TYPE}


async def _post_normalized(
    client: AsyncSchemaRegistryClient, action: str, subject: str, schema: RawSchema
) -> dict[str, Any] | None:
    """POST a schema to the subject's `action` endpoint with normalize=true; the JSON answer,
    or None when the registry says 404 (no such subject, or no such schema under it)."""
    url, method = client.url_manager.url_for(action, subject=subject)
    response = await client.request(
        url, method=method, body=_schema_body(schema), params={"normalize": "true"}
    )
    if response.status_code == 404:
        return None
    if not response.is_success:
        raise ClientError(
            f"{action} {subject}: HTTP {response.status_code}",
            http_code=response.status_code,
            server_traceback=response.text,
        )
    return response.json()


async def lookup_schema(
    client: AsyncSchemaRegistryClient, subject: str, schema: RawSchema
) -> int | None:
    """The id of `schema` (in canonical form) under `subject`, or None if not registered.
    Raises ClientError or httpx errors when the registry fails."""
    found = await _post_normalized(client, "check_version", subject, schema)
    return None if found is None else int(found["id"])


async def register_schema(
    client: AsyncSchemaRegistryClient, subject: str, schema: RawSchema
) -> tuple[int, bool]:
    """(id, registered now): `schema` under `subject`, looked up first so that registering
    again, or after a doc-only edit, adds no version. 409: the subject's compatibility level
    refuses it."""
    schema_id = await lookup_schema(client, subject, schema)
    if schema_id is not None:
        return schema_id, False
    registered = await _post_normalized(client, "register", subject, schema)
    if registered is None:
        raise ClientError(f"register {subject}: HTTP 404", http_code=404)
    return int(registered["id"]), True


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
        try:
            if self._auto_register:
                schema_id, _ = await register_schema(self._client, subject, writer.raw)
                return schema_id
            found = await lookup_schema(self._client, subject, writer.raw)
        except Exception as exc:  # httpx transport errors, ClientError, bad responses
            raise _encode_failure(exc, topic) from exc
        if found is None:
            raise EventEncodeError(
                EncodeReason.UNKNOWN_SCHEMA,
                f"schema of {writer.fullname} is not registered under {subject} (register it "
                "with `voiceclone schemas register`)",
                topic=topic,
            )
        return found

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
