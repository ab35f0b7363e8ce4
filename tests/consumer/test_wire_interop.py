"""A client of another team, built from the docs alone, talks to a real worker.

The client side uses plain fastavro and the `.avsc` file, nothing of ours: it encodes exactly as
docs/contracts.md says, sends through the real broker, and a worker (http backend
against the seed server) answers. A writer on a newer schema is refused as documented, and read
once its schema is supplied.
"""

import io
import json
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fastavro
import pytest
from aiokafka import AIOKafkaProducer

from consumer.backends import BackendSettings
from consumer.settings import WorkerSettings
from schemas.events import AudioReady
from tests.fixtures.model import REFERENCE_TRANSCRIPT
from tests.fixtures.seed import SeedServer
from tests.fixtures.worker import Outcomes, WorkerSettingsFactory, running_worker

pytestmark = pytest.mark.timeout(120)

SCHEMA_FILE = Path(__file__).parents[2] / "schemas" / "avro" / "clone_request.avsc"


def readme_encode(schema_json: dict[str, Any], record: dict[str, Any]) -> bytes:
    """Avro single-object encoding as docs/contracts.md describes it, with fastavro alone."""
    schema = fastavro.parse_schema(schema_json)
    canonical = fastavro.schema.to_parsing_canonical_form(schema)
    # fastavro's CRC-64-AVRO hex string is the 8 bytes in little-endian order.
    fingerprint = bytes.fromhex(fastavro.schema.fingerprint(canonical, "CRC-64-AVRO"))
    body = io.BytesIO()
    fastavro.schemaless_writer(body, schema, record)
    return b"\xc3\x01" + fingerprint + body.getvalue()


def request_record(voice_uri: str, **changes: Any) -> dict[str, Any]:
    """A CloneRequest as a plain dict; fields left out take their schema defaults."""
    return {
        "request_id": uuid.uuid4().hex,
        "tenant_id": "other-team",
        "voice": {
            "voice_id": "voice-1",
            "reference_audio_uri": voice_uri,
            "reference_text": REFERENCE_TRANSCRIPT,
        },
        "text": "Hello from a client that only read the README.",
        "created_at": datetime.now(UTC),
        "metadata": {"team": "other"},
        **changes,
    }


def newer_schema() -> dict[str, Any]:
    """clone_request.avsc as a later release might have it: a field with a default, and a
    language symbol this worker does not know."""
    schema = json.loads(SCHEMA_FILE.read_text())
    schema["fields"].append({"name": "speaking_rate", "type": "double", "default": 1.0})
    [language] = [f for f in schema["fields"] if f["name"] == "language"]
    language["type"]["symbols"].append("KLINGON")
    return schema


async def send(settings: WorkerSettings, *records: tuple[bytes, bytes]) -> None:
    """(key, value) pairs to the request topic, with the optional routing header."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all")
    await producer.start()
    try:
        for key, value in records:
            headers = [("voiceclone-event-type", b"io.voiceclone.events.CloneRequest")]
            await producer.send_and_wait(settings.topics.requests, value, key=key, headers=headers)
    finally:
        await producer.stop()


@pytest.fixture
def http_settings(
    make_worker_settings: WorkerSettingsFactory, seed_server: SeedServer
) -> WorkerSettingsFactory:
    def make(**overrides: Any) -> WorkerSettings:
        backend = BackendSettings(kind="http", http={"base_url": seed_server.url})
        return make_worker_settings(backend=backend, **overrides)

    return make


async def test_a_client_built_from_the_readme_gets_its_audio(
    http_settings: WorkerSettingsFactory, voice_uri: str
) -> None:
    settings = http_settings()
    current = request_record(voice_uri)
    newer = request_record(voice_uri, language="KLINGON", speaking_rate=1.5)
    newer_value = readme_encode(newer_schema(), newer)

    async with Outcomes(settings) as outcomes, running_worker(settings):
        await send(
            settings,
            (b"current", readme_encode(json.loads(SCHEMA_FILE.read_text()), current)),
            (b"newer", newer_value),
        )
        await outcomes.wait_for([current["request_id"]])
        await outcomes.wait_for_dead_letters(1)

    ready = outcomes.first(current["request_id"])
    assert isinstance(ready, AudioReady)
    assert (ready.tenant_id, ready.metadata) == ("other-team", {"team": "other"})
    # The newer writer's schema is not one this worker ships: refused, saying which and why.
    [letter] = outcomes.dead_letters
    assert (letter.key, letter.value) == (b"newer", newer_value)
    dlq = dict(letter.headers)
    assert dlq["dlq.error.reason"] == b"unknown_schema"
    message = dlq["dlq.error.message"].decode()
    assert f"unknown writer schema fingerprint {newer_value[2:10].hex()}" in message
    assert "upgrade it, give it the writer's .avsc as an extra schema" in message


async def test_a_newer_writer_is_read_once_its_schema_is_supplied(
    http_settings: WorkerSettingsFactory, voice_uri: str, tmp_path: Path, seed_server: SeedServer
) -> None:
    extra = tmp_path / "extra-schemas"
    extra.mkdir()
    (extra / "clone_request.next.avsc").write_text(json.dumps(newer_schema()))
    settings = http_settings(extra_schemas_dir=extra)
    newer = request_record(voice_uri, language="KLINGON", speaking_rate=1.5)

    async with Outcomes(settings) as outcomes, running_worker(settings):
        await send(settings, (b"newer", readme_encode(newer_schema(), newer)))
        await outcomes.wait_for([newer["request_id"]])

    assert isinstance(outcomes.first(newer["request_id"]), AudioReady)
    assert outcomes.dead_letters == []
    # The unknown symbol was read as the enum's default, AUTO.
    [(_, body)] = seed_server.requests
    assert body["language"] == "Auto"
