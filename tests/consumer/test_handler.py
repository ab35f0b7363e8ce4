"""How the record handler reads requests in the Schema Registry wire format, through a running
worker: an unknown language symbol resolves to the schema's default, and a registry outage is
waited out rather than dead-lettered (the bytes are fine; only the schema lookup failed)."""

import asyncio
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from schema_registry.client import AsyncSchemaRegistryClient

from consumer.backends import BackendSettings
from consumer.settings import WorkerSettings
from schemas.codec import make_codec
from schemas.events import AudioReady, CloneFailed, ErrorCode, Language
from schemas.registry import subject_for
from tests.fixtures.seed import SeedServer
from tests.fixtures.worker import (
    Outcomes,
    Requests,
    WorkerSettingsFactory,
    clone_request,
    running_worker,
)
from tests.schemas.fake_registry import FakeSchemaRegistry
from tests.schemas.variants import registry_record, shipped, with_symbol

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def schema_registry() -> Iterator[FakeSchemaRegistry]:
    registry = FakeSchemaRegistry()
    registry.start()
    yield registry
    registry.stop()


@pytest.fixture
def registry_settings(
    make_worker_settings: WorkerSettingsFactory,
    seed_server: SeedServer,
    schema_registry: FakeSchemaRegistry,
) -> WorkerSettings:
    return make_worker_settings(
        backend=BackendSettings(kind="http", http={"base_url": seed_server.url}),
        schema_registry_url=schema_registry.url,
    )


async def test_a_language_added_after_this_worker_was_built_is_served_as_auto(
    registry_settings: WorkerSettings, schema_registry: FakeSchemaRegistry, voice_uri: str
) -> None:
    settings = registry_settings
    request = clone_request(voice_uri)
    newer = with_symbol(shipped("clone_request"), "Language", "KLINGON")
    client = AsyncSchemaRegistryClient(schema_registry.url)
    schema_id = await client.register(subject_for(settings.topics.requests), copy.deepcopy(newer))
    record: dict[str, Any] = request.to_avro() | {"language": "KLINGON"}
    written = registry_record(schema_id, newer, record)

    async with (
        Requests(settings) as requests,
        Outcomes(settings) as outcomes,
        running_worker(settings),
    ):
        await requests.send_raw(written.value, written.headers, key=b"newer")
        await outcomes.wait_for([request.request_id])

    ready = outcomes.first(request.request_id)
    assert isinstance(ready, AudioReady)
    assert ready.language == Language.AUTO  # the enum's default, as the schema documents
    assert outcomes.dead_letters == []


async def test_a_registry_outage_is_waited_out_not_dead_lettered(
    registry_settings: WorkerSettings, schema_registry: FakeSchemaRegistry, voice_uri: str
) -> None:
    settings = registry_settings
    request = clone_request(voice_uri)
    written = await make_codec(schema_registry.url).encode(settings.topics.requests, request)
    schema_registry.fail_with = 503

    async with (
        Requests(settings) as requests,
        Outcomes(settings) as outcomes,
        running_worker(settings),
    ):
        await requests.send_raw(written.value, written.headers, key=b"outage")
        await until(lambda: schema_registry.count("GET", "/schemas/ids/") >= 2)  # retrying
        schema_registry.fail_with = None
        await outcomes.wait_for([request.request_id])

    assert isinstance(outcomes.first(request.request_id), AudioReady)
    assert outcomes.dead_letters == []


async def test_a_registry_outage_while_publishing_the_outcome_is_waited_out(
    registry_settings: WorkerSettings,
    schema_registry: FakeSchemaRegistry,
    voice_uri: str,
    reference_root: Path,
) -> None:
    settings = registry_settings
    first = clone_request(voice_uri)
    # Fails, so its outcome goes to the clone-failed topic, whose schema is not looked up yet.
    failing = clone_request((reference_root / "missing.wav").as_uri())
    failed_subject = f"/subjects/{subject_for(settings.topics.failed)}"

    async with (
        Requests(settings) as requests,
        Outcomes(settings) as outcomes,
        running_worker(settings),
    ):
        await requests.send(first)  # the request schema is now known to the worker
        await outcomes.wait_for([first.request_id])
        schema_registry.fail_with = 503
        await requests.send(failing)
        await until(lambda: schema_registry.count("POST", failed_subject) >= 2)  # retrying
        schema_registry.fail_with = None
        await outcomes.wait_for([failing.request_id])

    failed = outcomes.first(failing.request_id)
    assert isinstance(failed, CloneFailed)
    assert failed.error_code == ErrorCode.REFERENCE_AUDIO_UNAVAILABLE
    assert outcomes.dead_letters == []


async def until(condition: Any, within_s: float = 30.0, step_s: float = 0.05) -> None:
    """Poll a condition of a server running in another thread (no event to wait on)."""
    for _ in range(round(within_s / step_s)):
        if condition():
            return
        await asyncio.sleep(step_s)
    raise AssertionError(f"not true after {within_s} s")
