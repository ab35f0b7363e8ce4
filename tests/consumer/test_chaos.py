"""Chaos on the real broker: 1,000 requests through `voiceclone worker` processes that are
SIGKILLed at random moments and restarted, a backend with random latency and 10 % transient
failures, and the broker itself stopped and restarted mid-run.

Afterwards a read_committed subscriber sees, per request: exactly one outcome under
`exactly_once`; at least one under `at_least_once`, repeats identical but for their timings;
every audio-ready's object is there with the bytes its sha256 names, and the group has
committed everything. The test prints its counts.
"""

import asyncio
import contextlib
import random
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from consumer.backends import BackendSettings
from consumer.reference import ReferenceSettings
from consumer.settings import ProcessingGuarantee, RetrySettings, WorkerSettings
from producer.admin import create_topics
from producer.client import download_audio
from producer.settings import KafkaSettings
from producer.storage import StorageSettings
from schemas.events import AudioReady
from schemas.topics import Topics
from tests.fixtures.kafka import OwnBroker
from tests.fixtures.process import WorkerProcess, worker_process
from tests.fixtures.seed import SeedServer
from tests.fixtures.worker import Outcomes, Requests, clone_request, group_lag

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REQUESTS = 1_000
WORKERS = 2
KILLS = 5
BROKER_RESTART_AFTER_KILL = 2
SECONDS_BETWEEN_KILLS = (1.0, 2.5)
# Volatile by nature: when and how fast the outcome was made, whether a container was cold.
_VOLATILE = {"timings", "completed_at", "cold_start"}


@dataclass
class Counts:
    requests: int = REQUESTS
    kills: int = 0
    restarts: int = 0
    exits: list[str] = field(default_factory=list)  # workers that stopped by themselves
    broker_restarts: int = 0
    transient_failures: int = 0
    outcomes: int = 0
    lost: int = 0
    duplicates: int = 0
    seconds: float = 0.0

    def line(self, guarantee: str) -> str:
        fields = {**vars(self), "exits": len(self.exits)}
        reasons = sorted({why[:80] for why in self.exits})
        text = " ".join(f"{name}={value}" for name, value in fields.items())
        return f"chaos[{guarantee}]: {text}" + (
            f" (exited: {'; '.join(reasons)})" if reasons else ""
        )


@dataclass
class Slot:
    """One worker of the group, killed and started again under the same transactional id."""

    settings: WorkerSettings
    stack: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)
    worker: WorkerProcess | None = None

    async def start(self) -> None:
        self.worker = await self.stack.enter_async_context(worker_process(self.settings, "info"))

    async def kill(self) -> None:
        assert self.worker is not None
        if self.worker.process.returncode is None:
            self.worker.process.send_signal(signal.SIGKILL)
            await self.worker.process.wait()

    async def revive(self) -> str | None:
        """As a supervisor would: start the worker again if it exited by itself (it exits 3 when
        it cannot start, the broker being down); why it exited, if it did."""
        assert self.worker is not None
        if self.worker.process.returncode is None:
            return None
        why = next((e["line"] for e in reversed(self.worker.logs) if "line" in e), "no reason")
        await self.start()
        return why.strip()

    async def stop(self) -> None:
        """SIGTERM: it must drain, commit and exit 0."""
        assert self.worker is not None
        if self.worker.process.returncode is None:
            self.worker.process.send_signal(signal.SIGTERM)
        code = await self.worker.exit_code(within_s=60)
        assert code == 0, f"exit {code}: {self.worker.logs[-5:]}"


def chaos_settings(
    bootstrap: str, tmp_path: Path, seed: SeedServer, guarantee: ProcessingGuarantee
) -> WorkerSettings:
    references = tmp_path / "references"
    run = uuid.uuid4().hex[:8]
    return WorkerSettings(
        kafka=KafkaSettings(bootstrap_servers=bootstrap, client_id="chaos"),
        topics=Topics(
            requests=f"chaos-requests-{run}",
            audio_ready=f"chaos-ready-{run}",
            failed=f"chaos-failed-{run}",
            cancel=f"chaos-cancel-{run}",
            dlq=f"chaos-dlq-{run}",
        ),
        group_id=f"chaos-{run}",
        processing_guarantee=guarantee,
        storage=StorageSettings(kind="local", local_root=tmp_path / "audio"),
        reference=ReferenceSettings(allowed_schemes=["file"], file_root=references),
        backend=BackendSettings(kind="http", http={"base_url": seed.url}),
        # 10 % transient failures: ten quick tries make a request that fails them all
        # (1e-10) practically impossible, so every outcome is an audio-ready.
        retry=RetrySettings(max_attempts=10, initial_backoff_seconds=0.01, max_backoff_seconds=0.1),
        max_in_flight=4,
        poll_timeout_ms=100,
        shutdown_grace_seconds=20,
        http={"host": "127.0.0.1", "port": 0},
    )


def comparable(outcome: AudioReady) -> dict[str, Any]:
    return outcome.model_dump(exclude=_VOLATILE)


async def restart_broker(broker: OwnBroker) -> None:
    await asyncio.to_thread(broker.stop)
    await asyncio.sleep(1.0)
    await asyncio.to_thread(broker.start)


async def wreak_chaos(
    slots: list[Slot], broker: OwnBroker, outcomes: Outcomes, counts: Counts
) -> None:
    """Kill a random worker every second or two, restarting it at once; restart the broker once."""
    while counts.kills < KILLS:
        await supervise(slots, outcomes, random.uniform(*SECONDS_BETWEEN_KILLS), counts)
        slot = random.choice(slots)
        await slot.kill()
        counts.kills += 1
        await slot.start()
        counts.restarts += 1
        if counts.kills == BROKER_RESTART_AFTER_KILL:
            await restart_broker(broker)
            counts.broker_restarts += 1


async def supervise(slots: list[Slot], outcomes: Outcomes, seconds: float, counts: Counts) -> None:
    """Read outcomes for `seconds`, then start again any worker that exited by itself."""
    await outcomes.read_for(seconds)
    for slot in slots:
        if (why := await slot.revive()) is not None:
            counts.exits.append(why)


async def all_outcomes(
    slots: list[Slot], outcomes: Outcomes, ids: list[str], counts: Counts, within_s: float
) -> None:
    deadline = time.monotonic() + within_s
    while not set(ids) <= outcomes.by_id.keys():
        assert time.monotonic() < deadline, f"{len(set(ids) - outcomes.by_id.keys())} missing"
        await supervise(slots, outcomes, 1.0, counts)


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
    settings = chaos_settings(own_kafka.bootstrap, tmp_path, seed_server, guarantee)
    assert settings.reference.file_root is not None
    settings.reference.file_root.mkdir()
    (settings.reference.file_root / "voice.wav").write_bytes(reference_wav)
    voice = (settings.reference.file_root / "voice.wav").as_uri()
    await create_topics(settings, partitions=6)
    batch = [clone_request(voice) for _ in range(REQUESTS)]
    ids = [request.request_id for request in batch]
    counts = Counts()
    started = time.monotonic()

    slots = [
        Slot(settings.model_copy(update={"transactional_id": f"chaos-worker-{n}"}))
        for n in range(WORKERS)
    ]
    async with Requests(settings) as requests, Outcomes(settings) as outcomes:
        await requests.send(*batch)
        try:
            for slot in slots:
                await slot.start()
            await wreak_chaos(slots, own_kafka, outcomes, counts)
            await all_outcomes(slots, outcomes, ids, counts, within_s=300)
            for slot in slots:
                await slot.stop()
        finally:
            for slot in slots:
                await slot.stack.aclose()
        await outcomes.read_to_end()

    counts.seconds = round(time.monotonic() - started, 1)
    counts.transient_failures = seed_server.transient_failures
    counts.outcomes = sum(len(found) for found in outcomes.by_id.values())
    counts.lost = len(set(ids) - outcomes.by_id.keys())
    counts.duplicates = counts.outcomes - len(outcomes.by_id)
    with capsys.disabled():
        print(f"\n{counts.line(guarantee)}")

    assert counts.kills >= KILLS
    assert counts.broker_restarts == 1
    assert counts.transient_failures > 0
    assert counts.lost == 0
    if guarantee is ProcessingGuarantee.EXACTLY_ONCE:
        assert outcomes.duplicates() == {}
    for request_id in ids:
        first, *repeats = outcomes.by_id[request_id]
        assert isinstance(first, AudioReady), first
        assert all(comparable(again) == comparable(first) for again in repeats)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    for request_id in ids:  # each object is there, with the bytes its event names
        await download_audio(outcomes.first(request_id), downloads)
    lag = await group_lag(
        settings.kafka.bootstrap_servers, settings.group_id, settings.topics.requests
    )
    assert set(lag.values()) == {0}, lag
