"""Chaos on the real broker: 1,000 requests through `voiceclone worker` processes that are
SIGKILLed at random moments and restarted, a backend with random latency and 10 % transient
failures, and the broker itself stopped and restarted mid-run.

Afterwards a read_committed subscriber sees, per request: exactly one outcome under
`exactly_once`; at least one under `at_least_once`, repeats identical but for their timings;
every audio-ready's object is there with the bytes its sha256 names, and the group has
committed everything. The test prints its counts.
"""

import asyncio
from pathlib import Path

import pytest

from consumer.settings import ProcessingGuarantee
from producer.admin import create_topics
from producer.settings import KafkaSettings
from tests.fixtures.chaos import Chaos, chaos_run, chaos_settings, kill_a_worker
from tests.fixtures.kafka import OwnBroker
from tests.fixtures.seed import SeedServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REQUESTS = 1_000
KILLS = 5
BROKER_RESTART_AFTER_KILL = 2


async def restart_broker(broker: OwnBroker) -> None:
    await asyncio.to_thread(broker.stop)
    await asyncio.sleep(1.0)
    await asyncio.to_thread(broker.start)


async def wreak_chaos(chaos: Chaos, broker: OwnBroker) -> None:
    """Kill a random worker every second or two, restarting it at once; restart the broker once."""
    while chaos.counts.kills < KILLS:
        await kill_a_worker(chaos)
        if chaos.counts.kills == BROKER_RESTART_AFTER_KILL:
            await restart_broker(broker)
            chaos.counts.fault("broker_restarts")


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
    settings = chaos_settings(kafka, tmp_path, seed_server, guarantee, reference_wav)
    await create_topics(settings, partitions=6)

    async with chaos_run(settings, seed_server, REQUESTS, tmp_path, within_s=300) as chaos:
        await chaos.requests.send(*chaos.batch)
        await wreak_chaos(chaos, own_kafka)

    counts = chaos.counts
    with capsys.disabled():
        print(f"\n{counts.line(f'chaos[{guarantee}]')}")
    with chaos.logs_on_failure():
        assert counts.kills >= KILLS
        assert counts.faults == {"broker_restarts": 1}
        assert counts.transient_failures > 0
        assert counts.lost == 0
    await chaos.check(tmp_path)
