"""Registry mode against a real registry (the session's Apicurio Registry, or
$VOICECLONE_SCHEMA_REGISTRY_URL): registered versions, compatibility levels, unknown ids, lookups
after doc-only edits, and the `voiceclone schemas` commands.

Each test works on subjects of its own (fresh topic names), so tests sharing the registry never
see each other's versions or levels.
"""

import copy
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from schema_registry.client import AsyncSchemaRegistryClient

from producer.settings import ClientSettings
from schemas import contracts
from schemas.codec import AVRO_DIR, SchemaStore
from schemas.compatibility import Compatibility
from schemas.errors import EncodeReason, EventEncodeError
from schemas.events import Event, Language
from schemas.registry import subject_for
from schemas.topics import Topics
from schemas.wire_format import make_codec
from tests.schemas.samples import SAMPLES, full_request, minimal_request
from tests.schemas.variants import (
    Json,
    registry_record,
    shipped,
    with_fields,
    with_symbol,
    without_fields,
)


@pytest.fixture
def topics() -> Topics:
    tag = uuid.uuid4().hex[:10]
    return Topics(**{field: f"{field}-{tag}" for field in Topics.model_fields})


@pytest.fixture
def client(schema_registry_url: str) -> AsyncSchemaRegistryClient:
    return AsyncSchemaRegistryClient(schema_registry_url)


def versions(url: str, subject: str) -> list[int]:
    response = httpx.get(f"{url}/subjects/{subject}/versions")
    return [] if response.status_code == 404 else response.json()


@pytest.mark.parametrize(("field", "event"), SAMPLES, ids=[type(e).__name__ for _, e in SAMPLES])
async def test_every_event_round_trips_through_registered_ids(
    schema_registry_url: str, topics: Topics, field: str, event: Event
) -> None:
    topic = getattr(topics, field)
    encoded = await make_codec(schema_registry_url, topics=topics).encode(topic, event)
    # Confluent wire format: magic 0, then the id the registry holds for the current schema.
    registered = await AsyncSchemaRegistryClient(schema_registry_url).get_schema(subject_for(topic))
    assert registered is not None
    assert encoded.value[0] == 0
    assert int.from_bytes(encoded.value[1:5], "big") == registered.schema_id
    reader = make_codec(schema_registry_url, topics=topics)  # a fresh process: no caches
    assert await reader.decode(topic, encoded.value, encoded.headers) == event


async def test_lookup_only_writer_needs_registered_schemas(
    schema_registry_url: str, topics: Topics, client: AsyncSchemaRegistryClient
) -> None:
    writer = make_codec(schema_registry_url, topics=topics, auto_register=False)
    with pytest.raises(EventEncodeError) as caught:
        await writer.encode(topics.requests, full_request())
    assert caught.value.reason == EncodeReason.UNKNOWN_SCHEMA
    assert versions(schema_registry_url, subject_for(topics.requests)) == []

    await contracts.register(client, contracts.contracts(topics), Compatibility.BACKWARD)
    encoded = await writer.encode(topics.requests, full_request())
    assert (
        await make_codec(schema_registry_url, topics=topics).decode(
            topics.requests, encoded.value, []
        )
        == full_request()
    )


async def test_the_settings_register_nothing_unless_told_to(
    schema_registry_url: str, topics: Topics
) -> None:
    """Production registries are usually write-protected: the worker's and the client's codec
    only look schemas up, unless VOICECLONE_SCHEMA_REGISTRY_AUTO_REGISTER says otherwise."""
    subject = subject_for(topics.requests)
    looking = ClientSettings(schema_registry_url=schema_registry_url, topics=topics).make_codec()
    with pytest.raises(EventEncodeError) as caught:
        await looking.encode(topics.requests, full_request())
    assert caught.value.reason == EncodeReason.UNKNOWN_SCHEMA
    assert versions(schema_registry_url, subject) == []

    registering = ClientSettings(
        schema_registry_url=schema_registry_url, topics=topics, schema_registry_auto_register=True
    ).make_codec()
    await registering.encode(topics.requests, full_request())
    assert versions(schema_registry_url, subject) == [1]


def store_with(request_schema: Json) -> SchemaStore:
    """A store whose CloneRequest (the schema encoders write with) is `request_schema`."""
    others = [shipped(stem) for stem in ("audio_ready", "clone_failed", "clone_cancel")]
    return SchemaStore([request_schema, *others])


def _doc_edited(schema: Json) -> Json:
    edited = copy.deepcopy(schema)
    edited["doc"] = f"{edited.get('doc', '')} Edited: {uuid.uuid4().hex}"
    edited["fields"][0]["doc"] = "A different field doc."
    return edited


async def test_a_doc_only_edit_finds_the_registered_version(
    schema_registry_url: str, topics: Topics, client: AsyncSchemaRegistryClient
) -> None:
    """The registry compares text unless asked to normalize: a lookup-only writer whose schema
    differs from the registered one only in `doc` must still find it, and registering it again
    must add no version."""
    [first, *_] = await contracts.register(
        client, contracts.contracts(topics), Compatibility.BACKWARD
    )
    edited = _doc_edited(shipped("clone_request"))
    writer = make_codec(
        schema_registry_url, topics=topics, store=store_with(edited), auto_register=False
    )
    encoded = await writer.encode(topics.requests, minimal_request())
    assert int.from_bytes(encoded.value[1:5], "big") == first.schema_id

    registering = make_codec(schema_registry_url, topics=topics, store=store_with(edited))
    await registering.encode(topics.requests, minimal_request())
    assert versions(schema_registry_url, first.subject) == [1]


# Versions of CloneRequest in the order a team would release them.
OLDER = without_fields(
    shipped("clone_request"), "generation", "deadline", "output_format", "metadata"
)
NEWER = with_symbol(
    with_fields(
        shipped("clone_request"),
        {"name": "speaking_rate", "type": "double", "default": 1.0},
    ),
    "Language",
    "KLINGON",
)


def _newer_record(event: Event) -> dict[str, Any]:
    return {**event.to_avro(), "speaking_rate": 1.5, "language": "KLINGON"}


async def test_evolution_through_registered_versions_both_ways(
    schema_registry_url: str, topics: Topics, client: AsyncSchemaRegistryClient
) -> None:
    """older -> current -> newer, each registered under BACKWARD; records written with the older
    and the newer version both read into the current reader; a breaking version is refused."""
    subject = subject_for(topics.requests)
    await client.update_compatibility(Compatibility.BACKWARD.value, subject)
    older_id = await client.register(subject, copy.deepcopy(OLDER))
    [current] = [
        r
        for r in await contracts.register(
            client, contracts.contracts(topics), Compatibility.BACKWARD
        )
        if r.subject == subject
    ]
    newer_id = await client.register(subject, copy.deepcopy(NEWER))
    assert versions(schema_registry_url, subject) == [1, 2, 3]
    assert len({older_id, current.schema_id, newer_id}) == 3

    reader = make_codec(schema_registry_url, topics=topics)
    event = minimal_request()
    older_record = {
        k: v for k, v in event.to_avro().items() if k in {f["name"] for f in OLDER["fields"]}
    }
    from_older = registry_record(older_id, OLDER, older_record)
    assert await reader.decode(topics.requests, from_older.value, []) == event
    from_newer = registry_record(newer_id, NEWER, _newer_record(event))
    decoded = await reader.decode(topics.requests, from_newer.value, [])
    assert decoded == event.model_copy(update={"language": Language.AUTO})

    # A required field without a default: the current data could not be read with it.
    breaking = with_fields(shipped("clone_request"), {"name": "priority", "type": "int"})
    writer = make_codec(schema_registry_url, topics=topics, store=store_with(breaking))
    with pytest.raises(EventEncodeError) as caught:
        await writer.encode(topics.requests, event)
    assert caught.value.reason == EncodeReason.SCHEMA_REJECTED
    assert versions(schema_registry_url, subject) == [1, 2, 3]


# -- the `voiceclone schemas` commands ----------------------------------------------------------


def voiceclone(*args: str, topics: Topics, url: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOICECLONE_")}
    env |= {f"VOICECLONE_TOPICS__{name.upper()}": topic for name, topic in topics}
    if url is not None:
        env["VOICECLONE_SCHEMA_REGISTRY_URL"] = url
    cmd = [sys.executable, "-m", "consumer", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=False)


def test_register_sets_levels_and_is_idempotent(schema_registry_url: str, topics: Topics) -> None:
    first = voiceclone("schemas", "register", topics=topics, url=schema_registry_url)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("(registered), BACKWARD") == 4
    again = voiceclone(
        "schemas", "register", "--compatibility", "full", topics=topics, url=schema_registry_url
    )
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("(already registered), FULL") == 4
    for field in ("requests", "audio_ready", "failed", "cancel"):
        subject = subject_for(getattr(topics, field))
        assert versions(schema_registry_url, subject) == [1]
        level = httpx.get(f"{schema_registry_url}/config/{subject}").json()
        assert level["compatibilityLevel"] == "FULL"
    assert versions(schema_registry_url, subject_for(topics.dlq)) == []


def test_check_passes_on_the_tree_with_and_without_a_registry(
    schema_registry_url: str, topics: Topics
) -> None:
    assert voiceclone("schemas", "register", topics=topics, url=schema_registry_url).returncode == 0
    with_registry = voiceclone("schemas", "check", topics=topics, url=schema_registry_url)
    assert with_registry.returncode == 0, with_registry.stderr
    assert f"the registry at {schema_registry_url}" in with_registry.stdout


def test_check_fails_when_the_registry_holds_an_incompatible_version(
    schema_registry_url: str, topics: Topics
) -> None:
    subject = subject_for(topics.requests)
    # What another team registered: `text` as an int, which our string field cannot read.
    theirs = shipped("clone_request")
    for field in theirs["fields"]:
        if field["name"] == "text":
            field["type"] = "int"
    httpx.put(f"{schema_registry_url}/config/{subject}", json={"compatibility": "BACKWARD"})
    body = {"schema": json.dumps(theirs)}
    assert httpx.post(f"{schema_registry_url}/subjects/{subject}/versions", json=body).is_success
    result = voiceclone("schemas", "check", topics=topics, url=schema_registry_url)
    assert result.returncode == 1
    assert f"{subject}: incompatible with its latest version" in result.stderr

    refused = voiceclone("schemas", "register", topics=topics, url=schema_registry_url)
    assert refused.returncode == 1
    assert "409" in refused.stderr or "ncompatible" in refused.stderr


def test_check_passes_on_the_tree_without_a_registry() -> None:
    """CI's history check: the working tree against every released version."""
    result = voiceclone("schemas", "check", topics=Topics(), url=None)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "compatible with the released versions"


def test_check_fails_on_an_incompatible_change_to_the_tree(tmp_path: Path) -> None:
    """No registry: the released versions alone. A new field without a default breaks it."""
    avro_dir = tmp_path / "avro"
    shutil.copytree(AVRO_DIR, avro_dir)
    path = avro_dir / "audio_ready.avsc"
    schema = json.loads(path.read_text())
    schema["fields"].append({"name": "loudness", "type": "float"})
    path.write_text(json.dumps(schema))
    result = voiceclone(
        "schemas", "check", "--schemas-dir", str(avro_dir), topics=Topics(), url=None
    )
    assert result.returncode == 1
    assert "io.voiceclone.events.AudioReady cannot read audio_ready.v1.avsc" in result.stderr
    assert "loudness" in result.stderr
