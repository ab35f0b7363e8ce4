"""A worker run until idle (`serve(until_idle=True)`, `voiceclone worker --until-idle`), as a
one-shot batch job: it answers every request its partitions hold, commits, and returns by
itself, never while a request is still running. In memory; the command on the broker."""

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from consumer import worker as worker_module
from consumer.backends import BackendSettings
from consumer.worker import PlainCommits
from schemas.events import AudioReady
from tests.fixtures.memory_kafka import MemoryKafka
from tests.fixtures.process import worker_process
from tests.fixtures.seed import SeedServer
from tests.fixtures.worker import (
    Outcomes,
    Requests,
    WorkerSettingsFactory,
    clone_request,
    group_lag,
    run_until_idle,
)

pytestmark = pytest.mark.timeout(120)


def http_backend(seed_server: SeedServer) -> BackendSettings:
    return BackendSettings(kind="http", http={"base_url": seed_server.url})


async def test_it_answers_and_commits_every_request_then_returns_never_while_one_runs(
    make_memory_settings: WorkerSettingsFactory,
    memory_kafka: MemoryKafka,
    seed_server: SeedServer,
    voice_uri: str,
) -> None:
    # No grace: work still running when it returned would be cancelled, left unanswered.
    settings = make_memory_settings(
        backend=http_backend(seed_server), max_in_flight=2, shutdown_grace_seconds=0
    )
    seed_server.delay_seconds = 0.2
    batch = [clone_request(voice_uri) for _ in range(9)]  # three in each partition
    async with Requests(settings, memory_kafka) as requests:
        for partition in range(3):
            await requests.send(*batch[partition::3], partition=partition)

    await run_until_idle(settings, memory_kafka)

    async with Outcomes(settings, memory_kafka) as outcomes:
        await outcomes.read_to_end()
    assert all(isinstance(outcomes.first(r.request_id), AudioReady) for r in batch)
    assert outcomes.duplicates() == {}
    assert set(memory_kafka.lag(settings.group_id, settings.topics.requests).values()) == {0}


async def test_with_nothing_to_do_it_returns_at_once(
    make_memory_settings: WorkerSettingsFactory, memory_kafka: MemoryKafka, seed_server: SeedServer
) -> None:
    settings = make_memory_settings(backend=http_backend(seed_server))

    await run_until_idle(settings, memory_kafka)

    assert seed_server.requests == []


async def test_the_command_exits_0_once_the_requests_sent_before_are_answered(
    make_worker_settings: WorkerSettingsFactory, seed_server: SeedServer, voice_uri: str
) -> None:
    settings = make_worker_settings(backend=http_backend(seed_server))
    batch = [clone_request(voice_uri) for _ in range(6)]

    async with Requests(settings) as requests, Outcomes(settings) as outcomes:
        await requests.send(*batch)
        async with worker_process(settings, options=["--until-idle"]) as worker:
            code = await worker.exit_code(within_s=60)
        await outcomes.wait_for([r.request_id for r in batch])

    assert code == 0, worker.logs[-5:]
    events = [entry["event"] for entry in worker.logs]
    assert events.index("worker_idle") < events.index("worker_draining")
    assert all(isinstance(outcomes.first(r.request_id), AudioReady) for r in batch)
    lag = await group_lag(
        settings.kafka.bootstrap_servers, settings.group_id, settings.topics.requests
    )
    assert set(lag.values()) == {0}, lag


async def test_partitions_that_fail_to_become_ready_are_tried_again_not_left_unread(
    make_memory_settings: WorkerSettingsFactory,
    memory_kafka: MemoryKafka,
    seed_server: SeedServer,
    voice_uri: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As when exactly_once's transaction coordinator does not answer at assignment: the
    # partitions stay paused; a group with one member has no next rebalance to try again.
    failures = [RuntimeError("coordinator not available")]
    assigned = PlainCommits.assigned

    async def flaky(
        self: PlainCommits, consumer: AIOKafkaConsumer, partitions: set[TopicPartition]
    ) -> None:
        if failures:
            raise failures.pop()
        await assigned(self, consumer, partitions)

    monkeypatch.setattr(PlainCommits, "assigned", flaky)
    monkeypatch.setattr(worker_module, "_READY_RETRY_SECONDS", 0.2)
    settings = make_memory_settings(backend=http_backend(seed_server))
    batch = [clone_request(voice_uri) for _ in range(3)]
    async with Requests(settings, memory_kafka) as requests:
        for partition in range(3):
            await requests.send(batch[partition], partition=partition)

    await run_until_idle(settings, memory_kafka)

    assert failures == []
    async with Outcomes(settings, memory_kafka) as outcomes:
        await outcomes.read_to_end()
    assert all(isinstance(outcomes.first(r.request_id), AudioReady) for r in batch)
