"""How the record handler reads requests in the Schema Registry wire format, through a running
worker (on Kafka in memory) on a real registry (Apicurio): twenty requests answered through
registered schemas, an unknown language symbol resolved to the schema's default, and a
registry outage (its process stopped) waited out rather than dead-lettered (the bytes are fine;
only the schema lookup failed), whether it hits reading the request or publishing the outcome.

The worker registers nothing (VOICECLONE_SCHEMA_REGISTRY_AUTO_REGISTER is off): each test
registers the product's schemas for its topics first, as `voiceclone schemas register` does.
The test's producer (`Requests`) registers its own, as an upstream service would."""

import copy
from pathlib import Path
from typing import Any

import pytest
from schema_registry.client import AsyncSchemaRegistryClient

from consumer.backends import BackendSettings
from consumer.settings import WorkerSettings
from schemas import contracts
from schemas.compatibility import Compatibility
from schemas.events import AudioReady, CloneFailed, ErrorCode, Language
from schemas.registry import subject_for
from schemas.wire_format import make_codec
from tests.fixtures.memory_kafka import MemoryKafka
from tests.fixtures.registry import OwnRegistry
from tests.fixtures.seed import SeedServer
from tests.fixtures.worker import (
    Outcomes,
    Requests,
    WorkerSettingsFactory,
    clone_request,
    running_worker,
)
from tests.schemas.variants import registry_record, shipped, with_symbol

pytestmark = pytest.mark.timeout(180)
# Long enough for a worker to have tried the stopped registry several times (its decode retry
# waits 1 s), short enough for the suite.
OUTAGE_S = 3.0


async def registry_settings(
    make_memory_settings: WorkerSettingsFactory, seed_server: SeedServer, url: str
) -> WorkerSettings:
    """A worker in registry mode at `url`, its topics' schemas registered."""
    settings = make_memory_settings(
        backend=BackendSettings(kind="http", http={"base_url": seed_server.url}),
        schema_registry_url=url,
    )
    assert not settings.schema_registry_auto_register
    client = AsyncSchemaRegistryClient(url)
    await contracts.register(client, contracts.contracts(settings.topics), Compatibility.BACKWARD)
    return settings


@pytest.fixture
async def shared_settings(
    make_memory_settings: WorkerSettingsFactory, seed_server: SeedServer, schema_registry_url: str
) -> WorkerSettings:
    return await registry_settings(make_memory_settings, seed_server, schema_registry_url)


@pytest.fixture
async def own_settings(
    make_memory_settings: WorkerSettingsFactory, seed_server: SeedServer, own_registry: OwnRegistry
) -> WorkerSettings:
    return await registry_settings(make_memory_settings, seed_server, own_registry.url)


async def test_twenty_requests_twenty_audio_ready_through_the_registry(
    shared_settings: WorkerSettings, memory_kafka: MemoryKafka, voice_uri: str
) -> None:
    settings = shared_settings
    sent = [clone_request(voice_uri) for _ in range(20)]
    async with (
        Requests(settings, memory_kafka) as requests,
        Outcomes(settings, memory_kafka) as outcomes,  # registry-aware: it decodes by schema id
        running_worker(settings, memory_kafka),
    ):
        await requests.send(*sent)
        await outcomes.wait_for([request.request_id for request in sent], within_s=90)

    assert all(isinstance(outcomes.first(r.request_id), AudioReady) for r in sent)
    assert outcomes.dead_letters == []
    assert outcomes.duplicates() == {}


async def test_a_language_added_after_this_worker_was_built_is_served_as_auto(
    shared_settings: WorkerSettings, memory_kafka: MemoryKafka, voice_uri: str
) -> None:
    settings = shared_settings
    request = clone_request(voice_uri)
    newer = with_symbol(shipped("clone_request"), "Language", "KLINGON")
    assert settings.schema_registry_url is not None
    client = AsyncSchemaRegistryClient(settings.schema_registry_url)
    schema_id = await client.register(subject_for(settings.topics.requests), copy.deepcopy(newer))
    record: dict[str, Any] = request.to_avro() | {"language": "KLINGON"}
    written = registry_record(schema_id, newer, record)

    async with (
        Requests(settings, memory_kafka) as requests,
        Outcomes(settings, memory_kafka) as outcomes,
        running_worker(settings, memory_kafka),
    ):
        await requests.send_raw(written.value, written.headers, key=b"newer")
        await outcomes.wait_for([request.request_id])

    ready = outcomes.first(request.request_id)
    assert isinstance(ready, AudioReady)
    assert ready.language == Language.AUTO  # the enum's default, as the schema documents
    assert outcomes.dead_letters == []


async def test_a_registry_outage_is_waited_out_not_dead_lettered(
    own_settings: WorkerSettings,
    memory_kafka: MemoryKafka,
    own_registry: OwnRegistry,
    voice_uri: str,
) -> None:
    settings = own_settings
    request = clone_request(voice_uri)
    written = await make_codec(own_registry.url).encode(settings.topics.requests, request)

    async with (
        Requests(settings, memory_kafka) as requests,
        Outcomes(settings, memory_kafka) as outcomes,
        running_worker(settings, memory_kafka),
    ):
        own_registry.stop()
        try:
            await requests.send_raw(written.value, written.headers, key=b"outage")
            await outcomes.read_for(OUTAGE_S)  # the worker cannot learn the schema: it waits
            assert outcomes.by_id == {}
            assert outcomes.dead_letters == []
        finally:
            own_registry.start()
        await outcomes.wait_for([request.request_id])

    assert isinstance(outcomes.first(request.request_id), AudioReady)
    assert outcomes.dead_letters == []


async def test_a_registry_outage_while_publishing_the_outcome_is_waited_out(
    own_settings: WorkerSettings,
    memory_kafka: MemoryKafka,
    own_registry: OwnRegistry,
    voice_uri: str,
    reference_root: Path,
) -> None:
    settings = own_settings
    first = clone_request(voice_uri)
    # Fails, so its outcome goes to the clone-failed topic, whose schema is not looked up yet.
    failing = clone_request((reference_root / "missing.wav").as_uri())

    async with (
        Requests(settings, memory_kafka) as requests,
        Outcomes(settings, memory_kafka) as outcomes,
        running_worker(settings, memory_kafka),
    ):
        await requests.send(first)  # the request schema is now known to the worker
        await outcomes.wait_for([first.request_id])
        own_registry.stop()
        try:
            await requests.send(failing)
            await outcomes.read_for(OUTAGE_S)  # its outcome cannot be encoded: it waits
            assert failing.request_id not in outcomes.by_id
            assert outcomes.dead_letters == []
        finally:
            own_registry.start()
        await outcomes.wait_for([failing.request_id])

    failed = outcomes.first(failing.request_id)
    assert isinstance(failed, CloneFailed)
    assert failed.error_code == ErrorCode.REFERENCE_AUDIO_UNAVAILABLE
    assert outcomes.dead_letters == []
