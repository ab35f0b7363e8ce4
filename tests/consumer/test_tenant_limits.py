"""One tenant cannot starve the others: at most `max_in_flight_per_tenant` of its requests run
at once, the rest wait without holding a worker slot (up to what the worker may hold). The
semaphores by key alone, the pipeline within the loop's admission, and a running worker (on
Kafka in memory) with a seed-contract service that counts how many calls of each tenant it
serves at once."""

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiohttp import web
from structlog.testing import capture_logs

from consumer.admission import KeyedSemaphores, TenantAdmission
from consumer.backends import BackendSettings
from consumer.errors import CloneError
from schemas.events import AudioReady, CloneRequest, ErrorCode
from tests.consumer.test_pipeline import MakePipeline, make_pipeline, storage  # noqa: F401
from tests.consumer.test_retries import serving
from tests.consumer.test_worker import assert_all_committed_in
from tests.fixtures.memory_kafka import MemoryKafka
from tests.fixtures.seed import SeedServer
from tests.fixtures.worker import (
    Outcomes,
    Requests,
    WorkerSettingsFactory,
    clone_request,
    running_worker,
)

pytestmark = pytest.mark.timeout(120)


@dataclass
class CountingSeed(SeedServer):
    """The seed service, counting the calls of each tenant (the text's prefix) it serves at
    once, and the most it ever did."""

    running: Counter[str] = field(default_factory=Counter)
    most: Counter[str] = field(default_factory=Counter)

    async def clone(self, request: web.Request) -> web.Response:
        tenant = (await request.json())["text"].split(":")[0]
        self.running[tenant] += 1
        self.most[tenant] = max(self.most[tenant], self.running[tenant])
        try:
            return await super().clone(request)
        finally:
            self.running[tenant] -= 1


@pytest.fixture
async def counting() -> AsyncIterator[CountingSeed]:
    server = CountingSeed()
    app = web.Application()
    app.router.add_post("/clone", server.clone)
    app.router.add_get("/health", server.health)
    async with serving(app) as url:
        server.url = url
        yield server


@pytest.fixture
def seed_server(counting: CountingSeed) -> CountingSeed:
    """The pipeline fixture's backend: the counting one."""
    return counting


# -- semaphores by key ------------------------------------------------------------------------


async def test_a_key_at_its_limit_queues_later_holders_in_order_and_leaves_other_keys_free() -> (
    None
):
    gate = KeyedSemaphores(limit=2)
    order: list[str] = []

    async def hold(key: str, name: str, release: asyncio.Event) -> None:
        async with gate.hold(key):
            order.append(name)
            await release.wait()

    release = asyncio.Event()
    tasks = [asyncio.create_task(hold("a", f"a{i}", release)) for i in range(4)]
    other = asyncio.create_task(hold("b", "b0", asyncio.Event()))
    await asyncio.sleep(0.05)

    assert order == ["a0", "a1", "b0"]
    assert gate.waiting == 2
    release.set()
    await asyncio.gather(*tasks)
    assert order == ["a0", "a1", "b0", "a2", "a3"]
    assert (gate.waiting, len(gate)) == (0, 1)  # only b's entry is left
    other.cancel()
    await asyncio.gather(other, return_exceptions=True)
    assert len(gate) == 0


async def test_a_waiter_that_times_out_or_is_cancelled_takes_no_place() -> None:
    waits: list[None] = []
    gate = KeyedSemaphores(limit=1, on_wait=lambda: waits.append(None))
    await gate.acquire("a")

    with pytest.raises(TimeoutError):
        await gate.acquire("a", timeout=0.05)
    cancelled = asyncio.create_task(gate.acquire("a"))
    await asyncio.sleep(0.01)
    cancelled.cancel()
    await asyncio.gather(cancelled, return_exceptions=True)

    assert (len(waits), gate.waiting) == (2, 0)
    gate.release("a")
    assert len(gate) == 0
    await asyncio.wait_for(gate.acquire("a"), 1)  # free again


# -- the pipeline, within the loop's admission ----------------------------------------------------


@pytest.fixture
def voice(reference_root: Path) -> str:
    return (reference_root / "voice.wav").as_uri()


def of(tenant: str, voice: str, **overrides: object) -> CloneRequest:
    return clone_request(voice, tenant_id=tenant, text=f"{tenant}: hello.", **overrides)


async def test_a_tenant_at_its_limit_waits_while_another_tenant_goes_ahead(
    make_pipeline: MakePipeline,  # noqa: F811
    counting: CountingSeed,
    voice: str,
) -> None:
    pipeline = make_pipeline()
    admission = TenantAdmission(limit=1)
    counting.delay_seconds = 0.5
    finished: list[str] = []  # names, in the order they finished

    async def run(request: CloneRequest, name: str) -> None:
        await pipeline.process(request, admission)
        finished.append(name)

    flood = [asyncio.create_task(run(of("a", voice), f"a{i}")) for i in range(3)]
    await asyncio.sleep(0.1)
    assert admission.waiting == 2
    await run(of("b", voice), "b")
    await asyncio.gather(*flood)

    assert finished.index("b") < finished.index("a1")  # not behind a's backlog
    assert finished[-2:] == ["a1", "a2"]
    assert counting.most == Counter({"a": 1, "b": 1})
    assert admission.waiting == 0


async def test_a_request_whose_deadline_passes_while_waiting_expires_without_a_backend_call(
    make_pipeline: MakePipeline,  # noqa: F811
    counting: CountingSeed,
    voice: str,
) -> None:
    pipeline = make_pipeline()
    admission = TenantAdmission(limit=1)
    counting.delay_seconds = 1.0
    first = asyncio.create_task(pipeline.process(of("a", voice), admission))
    await asyncio.sleep(0.1)
    hurried = of("a", voice, deadline=datetime.now(UTC) + timedelta(seconds=0.3))

    with pytest.raises(CloneError) as raised:
        await pipeline.process(hurried, admission)

    assert raised.value.code == ErrorCode.EXPIRED
    assert raised.value.message == "the request's deadline passed"
    assert isinstance(await first, AudioReady)
    assert len(counting.requests) == 1


# -- the worker, its consume loop admitting -------------------------------------------------------


async def test_a_flooding_tenant_does_not_hold_back_another_tenants_request(
    make_memory_settings: WorkerSettingsFactory,
    memory_kafka: MemoryKafka,
    counting: CountingSeed,
    voice: str,
) -> None:
    settings = make_memory_settings(
        backend=BackendSettings(kind="http", http={"base_url": counting.url}),
        max_in_flight=2,
        max_waiting=16,
        limits={"max_in_flight_per_tenant": 1},
    )
    counting.delay_seconds = 0.5
    flood = [of("a", voice) for _ in range(8)]
    other = of("b", voice)

    async with (
        Requests(settings, memory_kafka) as requests,
        Outcomes(settings, memory_kafka) as outcomes,
        running_worker(settings, memory_kafka),
    ):
        await requests.send(*flood)
        await requests.send(other)
        await outcomes.wait_for([other.request_id])
        published_before_b = list(outcomes.by_id).index(other.request_id)
        await outcomes.wait_for([r.request_id for r in flood], within_s=60)

    # Served beside the flood's first request, not after its backlog: one audio-ready
    # topic partition, so the outcomes are read in the order they were published.
    assert published_before_b <= 1
    assert counting.most == Counter({"a": 1, "b": 1})
    assert all(isinstance(outcomes.first(r.request_id), AudioReady) for r in [*flood, other])
    assert_all_committed_in(memory_kafka, settings)


async def test_a_backlog_of_one_tenant_holds_at_most_max_in_flight_plus_max_waiting_records(
    make_memory_settings: WorkerSettingsFactory,
    memory_kafka: MemoryKafka,
    counting: CountingSeed,
    voice: str,
) -> None:
    settings = make_memory_settings(
        backend=BackendSettings(kind="http", http={"base_url": counting.url}),
        max_in_flight=2,
        max_waiting=3,
        limits={"max_in_flight_per_tenant": 1},
    )
    counting.delay_seconds = 0.2
    flood = [of("a", voice) for _ in range(10)]

    with capture_logs() as logs:
        async with (
            Requests(settings, memory_kafka) as requests,
            Outcomes(settings, memory_kafka) as outcomes,
            running_worker(settings, memory_kafka),
        ):
            await requests.send(*flood, partition=0)
            await outcomes.wait_for([r.request_id for r in flood], within_s=60)

    # Its waiting records take no slot, so the worker fetches past them, up to the bound on
    # what it holds; then it pauses until one of them finishes.
    held = [entry["in_flight"] for entry in logs if entry["event"] == "record_started"]
    assert max(held) == settings.max_in_flight + settings.max_waiting
    assert counting.most == Counter({"a": 1})
    assert all(isinstance(outcomes.first(r.request_id), AudioReady) for r in flood)
    assert_all_committed_in(memory_kafka, settings)
