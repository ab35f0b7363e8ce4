"""Chaos on the real broker: 1,000 requests through `voiceclone worker` processes that are
SIGKILLed at random moments and restarted, a backend with random latency and 10 % transient
failures, and the broker itself stopped and restarted mid-run.

Afterwards a read_committed subscriber sees, per request: exactly one outcome under
`exactly_once`; at least one under `at_least_once`, repeats identical but for their timings;
every audio-ready's object is there with the bytes its sha256 names, and the group has
committed everything. The test prints its counts.
"""

import asyncio
import time
from pathlib import Path

import pytest

from consumer.settings import ProcessingGuarantee
from producer.admin import create_topics
from producer.settings import KafkaSettings
from tests.fixtures.chaos import (
    Counts,
    Slot,
    all_outcomes,
    chaos_settings,
    check_outcomes,
    count_outcomes,
    kill_a_worker,
    slots,
)
from tests.fixtures.kafka import OwnBroker
from tests.fixtures.seed import SeedServer
from tests.fixtures.worker import Outcomes, Requests, clone_request

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REQUESTS = 1_000
KILLS = 5
BROKER_RESTART_AFTER_KILL = 2


async def restart_broker(broker: OwnBroker) -> None:
    await asyncio.to_thread(broker.stop)
    await asyncio.sleep(1.0)
    await asyncio.to_thread(broker.start)


async def wreak_chaos(
    workers: list[Slot], broker: OwnBroker, outcomes: Outcomes, counts: Counts
) -> None:
    """Kill a random worker every second or two, restarting it at once; restart the broker once."""
    while counts.kills < KILLS:
        await kill_a_worker(workers, outcomes, counts)
        if counts.kills == BROKER_RESTART_AFTER_KILL:
            await restart_broker(broker)
            counts.fault("broker_restarts")


@pytest.mark.parametrize("guarantee", list(ProcessingGuarantee))
async def test_chaos(
    own_kafka: OwnBroker,
    seed_server: SeedServer,
    tmp_path: Path,
    reference_wav: bytes,
    guarantee: ProcessingGuarantee,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seed_server.delay_seconds, seed_server.jitter_seconds = 0.05, 0.1
    seed_server.transient_failure_rate = 0.1
    kafka = KafkaSettings(bootstrap_servers=own_kafka.bootstrap, client_id="chaos")
    settings = chaos_settings(kafka, tmp_path, seed_server, guarantee)
    assert settings.reference.file_root is not None
    settings.reference.file_root.mkdir()
    (settings.reference.file_root / "voice.wav").write_bytes(reference_wav)
    voice = (settings.reference.file_root / "voice.wav").as_uri()
    await create_topics(settings, partitions=6)
    batch = [clone_request(voice) for _ in range(REQUESTS)]
    ids = [request.request_id for request in batch]
    counts = Counts(REQUESTS)
    started = time.monotonic()

    workers = slots(settings)
    async with Requests(settings) as requests, Outcomes(settings) as outcomes:
        await requests.send(*batch)
        try:
            for slot in workers:
                await slot.start()
            await wreak_chaos(workers, own_kafka, outcomes, counts)
            await all_outcomes(workers, outcomes, ids, counts, within_s=300)
            for slot in workers:
                await slot.stop()
        finally:
            for slot in workers:
                await slot.stack.aclose()
        await outcomes.read_to_end()

    counts.seconds = round(time.monotonic() - started, 1)
    counts.transient_failures = seed_server.transient_failures
    count_outcomes(outcomes, ids, counts)
    with capsys.disabled():
        print(f"\n{counts.line(f'chaos[{guarantee}]')}")

    assert counts.kills >= KILLS
    assert counts.faults == {"broker_restarts": 1}
    assert counts.transient_failures > 0
    assert counts.lost == 0
    await check_outcomes(settings, outcomes, ids, tmp_path)
