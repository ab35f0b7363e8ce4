"""Schema evolution, both ways and in both wire formats.

Older writer -> current reader: fields the writer lacked take their defaults.
Newer writer -> current reader: added fields are dropped, unknown enum symbols become the
enum's default. Each needs the reader to know the writer schema: from the registry by id, or
(schemaless) from its SchemaStore, which ships every released version from
schemas/avro/history/.
"""

import copy
import io
import json
from pathlib import Path
from typing import Any

import fastavro
import pytest
from schema_registry.client import AsyncSchemaRegistryClient

from producer.settings import ClientSettings
from schemas import codec as codec_module
from schemas.codec import (
    AVRO_DIR,
    HISTORY_DIR,
    Codec,
    Encoded,
    SchemalessCodec,
    SchemaStore,
    load_schema_file,
    schema_fingerprint,
)
from schemas.errors import DecodeReason, EventDecodeError, InvalidSchemaError
from schemas.events import (
    EVENT_TYPES,
    AudioFormat,
    CloneRequest,
    ErrorCode,
    Event,
    Language,
    ModelName,
)
from schemas.registry import subject_for
from schemas.topics import Topics
from tests.schemas.pairs import CodecPair
from tests.schemas.samples import (
    full_audio_ready,
    full_cancel,
    full_failed,
    full_request,
    minimal_cancel,
    minimal_request,
)
from tests.schemas.variants import (
    Json,
    registry_record,
    schemaless_record,
    shipped,
    single_object_record,
    with_fields,
    with_symbol,
    without_fields,
    without_symbol,
)

TOPICS = Topics()

# v0 of CloneRequest: before generation, deadline, output_format and metadata, and ITALIAN.
OLDER_REQUEST = without_symbol(
    without_fields(shipped("clone_request"), "generation", "deadline", "output_format", "metadata"),
    "Language",
    "ITALIAN",
)

_NEW_FIELDS = (
    {"name": "speaking_rate", "type": "double", "default": 1.0, "doc": "Added in v2."},
    {"name": "style", "type": ["null", "string"], "default": None, "doc": "Added in v2."},
)


def _record(event: Event, **changes: Any) -> dict[str, Any]:
    return {**event.to_avro(), **changes}


# (topic, newer writer schema, record it writes, what the current reader must make of it)
NEWER: list[tuple[str, Json, dict[str, Any], Event]] = [
    (
        TOPICS.requests,
        with_symbol(
            with_symbol(with_fields(shipped("clone_request"), *_NEW_FIELDS), "Language", "ARABIC"),
            "AudioFormat",
            "AAC",
        ),
        _record(
            full_request(), speaking_rate=1.25, style="calm", language="ARABIC", output_format="AAC"
        ),
        full_request().model_copy(
            update={"language": Language.AUTO, "output_format": AudioFormat.WAV}
        ),
    ),
    (
        TOPICS.audio_ready,
        with_symbol(
            with_fields(shipped("audio_ready"), *_NEW_FIELDS), "ModelName", "QWEN4_TTS_BASE"
        ),
        _record(full_audio_ready(), model="QWEN4_TTS_BASE", style="calm"),
        full_audio_ready().model_copy(update={"model": ModelName.QWEN3_TTS_12HZ_1_7B_BASE}),
    ),
    (
        TOPICS.failed,
        with_symbol(shipped("clone_failed"), "ErrorCode", "QUOTA_EXCEEDED"),
        _record(full_failed(), error_code="QUOTA_EXCEEDED"),
        full_failed().model_copy(update={"error_code": ErrorCode.INFERENCE_FAILED}),
    ),
    (
        TOPICS.cancel,
        with_fields(shipped("clone_cancel"), *_NEW_FIELDS),
        _record(full_cancel(), speaking_rate=2.0),
        full_cancel(),
    ),
]
NEWER_IDS = [schema["name"] for _, schema, _, _ in NEWER]


def _older_record() -> dict[str, Any]:
    record = _record(minimal_request(), language="JAPANESE")
    for field in ("generation", "deadline", "output_format", "metadata"):
        del record[field]
    return record


OLDER_EXPECTED = minimal_request().model_copy(update={"language": Language.JAPANESE})


async def _write(codecs: CodecPair, topic: str, schema: Json, record: dict[str, Any]) -> Encoded:
    """Bytes a producer on another schema version would have sent, in the pair's format."""
    if codecs.registry_url is None:
        return schemaless_record(schema, record)
    client = AsyncSchemaRegistryClient(codecs.registry_url)
    schema_id = await client.register(subject_for(topic), copy.deepcopy(schema))
    return registry_record(schema_id, schema, record)


def _reader_knowing(codecs: CodecPair, *schemas: Json) -> Codec:
    """A reader codec that can know `schemas`: from the registry, or (schemaless) because
    they were shipped to it, i.e. are in its store."""
    if codecs.registry_url is not None:
        return codecs.reader
    store = SchemaStore.shipped()
    for schema in schemas:
        store.add(schema)
    return codecs.make(store=store)


async def test_older_writer_current_reader(codecs: CodecPair) -> None:
    encoded = await _write(codecs, TOPICS.requests, OLDER_REQUEST, _older_record())
    reader = _reader_knowing(codecs, OLDER_REQUEST)
    decoded = await reader.decode(TOPICS.requests, encoded.value, encoded.headers)
    assert decoded == OLDER_EXPECTED
    assert isinstance(decoded, CloneRequest)
    assert decoded.metadata == {}
    assert decoded.output_format is AudioFormat.WAV


@pytest.mark.parametrize(("topic", "schema", "record", "expected"), NEWER, ids=NEWER_IDS)
async def test_newer_writer_current_reader(
    codecs: CodecPair, topic: str, schema: Json, record: dict[str, Any], expected: Event
) -> None:
    encoded = await _write(codecs, topic, schema, record)
    reader = _reader_knowing(codecs, schema)
    assert await reader.decode(topic, encoded.value, encoded.headers) == expected


async def test_schemaless_reader_must_know_the_writer_version() -> None:
    """The price of schemaless mode: an unshipped version is unreadable, not misread."""
    encoded = schemaless_record(OLDER_REQUEST, _older_record())
    with pytest.raises(EventDecodeError) as caught:
        await SchemalessCodec(topics=TOPICS).decode(TOPICS.requests, encoded.value, encoded.headers)
    assert caught.value.reason == DecodeReason.UNKNOWN_SCHEMA


# A newer CloneRequest from a release this reader predates: a field with a default, a symbol.
NEWER_REQUEST = with_symbol(
    with_fields(shipped("clone_request"), *_NEW_FIELDS), "Language", "KLINGON"
)


def _newer_request() -> Encoded:
    record = _record(minimal_request(), language="KLINGON", speaking_rate=2.0)
    return single_object_record(NEWER_REQUEST, record)


async def test_a_newer_writer_is_refused_naming_its_fingerprint_and_the_remedy() -> None:
    encoded = _newer_request()
    fingerprint = encoded.value[2:10].hex()
    with pytest.raises(EventDecodeError) as caught:
        await SchemalessCodec(topics=TOPICS).decode(TOPICS.requests, encoded.value, [])
    assert caught.value.reason == DecodeReason.UNKNOWN_SCHEMA
    assert f"unknown writer schema fingerprint {fingerprint}" in str(caught.value)
    assert "upgrade it, give it the writer's .avsc as an extra schema, or use a Schema " in str(
        caught.value
    )


async def test_extra_schemas_make_a_newer_writer_readable(tmp_path: Path) -> None:
    (tmp_path / "clone_request.v9.avsc").write_text(json.dumps(NEWER_REQUEST))
    (tmp_path / "notes.txt").write_text("not a schema: ignored")
    codec = ClientSettings(extra_schemas_dir=tmp_path, topics=TOPICS).make_codec()
    encoded = _newer_request()
    decoded = await codec.decode(TOPICS.requests, encoded.value, encoded.headers)
    # The unknown symbol becomes the enum's default; the added field is dropped.
    assert decoded == minimal_request().model_copy(update={"language": Language.AUTO})


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (json.dumps({"type": "record", "name": "Other", "fields": []}), "Other is not one of"),
        ("{not json", "Expecting property name"),
    ],
)
def test_an_extra_schema_must_be_a_version_of_ours(
    tmp_path: Path, content: str, problem: str
) -> None:
    path = tmp_path / "stray.avsc"
    path.write_text(content)
    with pytest.raises(InvalidSchemaError, match=problem) as caught:
        SchemaStore.shipped(tmp_path)
    assert str(path) in str(caught.value)


async def test_versions_in_history_are_known_to_shipped_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "clone_request.v0.avsc").write_text(json.dumps(OLDER_REQUEST))
    monkeypatch.setattr(codec_module, "HISTORY_DIR", tmp_path)
    encoded = schemaless_record(OLDER_REQUEST, _older_record())
    decoded = await SchemalessCodec(topics=TOPICS).decode(
        TOPICS.requests, encoded.value, encoded.headers
    )
    assert decoded == OLDER_EXPECTED


async def test_older_reader_reads_what_the_current_codec_writes() -> None:
    """A consumer still on v0 (its reader schema) reads records from an up-to-date producer."""
    others = [
        load_schema_file(p) for p in sorted(AVRO_DIR.glob("*.avsc")) if p.stem != "clone_request"
    ]
    old_store = SchemaStore([OLDER_REQUEST, *others])
    # Readers upgrade first: by the time producers write v1, v0 readers have been shipped it.
    old_store.add(shipped("clone_request"))
    encoded = await SchemalessCodec(topics=TOPICS).encode(TOPICS.requests, full_request())
    decoded = await SchemalessCodec(topics=TOPICS, store=old_store).decode(
        TOPICS.requests, encoded.value, encoded.headers
    )
    # v0 has no generation/deadline/output_format/metadata: those fall back to model defaults.
    assert decoded == full_request().model_copy(
        update={
            "generation": None,
            "deadline": None,
            "output_format": AudioFormat.WAV,
            "metadata": {},
        }
    )


async def test_incompatible_writer_gives_typed_error(codecs: CodecPair) -> None:
    """A writer without a field the reader requires cannot be resolved: typed error, no guess."""
    broken = without_fields(shipped("clone_cancel"), "requested_at")
    record = {"request_id": "r", "tenant_id": "t", "metadata": {}}
    encoded = await _write(codecs, TOPICS.cancel, broken, record)
    reader = _reader_knowing(codecs, broken)
    with pytest.raises(EventDecodeError) as caught:
        await reader.decode(TOPICS.cancel, encoded.value, encoded.headers)
    assert caught.value.reason == DecodeReason.INCOMPATIBLE_SCHEMA


# -- released versions (schemas/avro/history) -------------------------------------------------


def _history() -> list[tuple[str, Json]]:
    return [(path.name, load_schema_file(path)) for path in sorted(HISTORY_DIR.glob("*.avsc"))]


def test_every_current_schema_is_released() -> None:
    released = {
        schema_fingerprint(fastavro.parse_schema(s, named_schemas={})) for _, s in _history()
    }
    for path in sorted(AVRO_DIR.glob("*.avsc")):
        current = fastavro.parse_schema(load_schema_file(path), named_schemas={})
        assert schema_fingerprint(current) in released, (
            f"{path.name} changed: copy it to schemas/avro/history/ as its next version"
        )


_SAMPLES_BY_NAME = {
    "CloneRequest": [full_request(), minimal_request()],
    "AudioReady": [full_audio_ready()],
    "CloneFailed": [full_failed()],
    "CloneCancel": [full_cancel(), minimal_cancel()],
}


def _through(writer: Json, reader: Json, event: Event) -> Event:
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, writer, event.to_avro())
    buffer.seek(0)
    return type(event).from_avro(fastavro.schemaless_reader(buffer, writer, reader))


@pytest.mark.parametrize(("name", "released"), _history(), ids=[name for name, _ in _history()])
def test_released_and_current_versions_read_each_other(name: str, released: Json) -> None:
    """Full compatibility: each direction resolves, and the fields both have survive."""
    assert {f"io.voiceclone.events.{n}" for n in _SAMPLES_BY_NAME} == set(EVENT_TYPES)
    current = SchemaStore.shipped().reader(f"{released['namespace']}.{released['name']}").parsed
    old = fastavro.parse_schema(released, named_schemas={})
    common = {field["name"] for field in released["fields"]} & {
        field["name"] for field in current["fields"]
    }
    for event in _SAMPLES_BY_NAME[released["name"]]:
        for writer, reader in ((current, old), (old, current)):
            decoded = _through(writer, reader, event)
            assert {f: getattr(decoded, f) for f in common} == {
                f: getattr(event, f) for f in common
            }
