"""No state of a request outlives it: after many requests through a running worker (several
tenants, references and cancels), nothing made for one of them is still alive but what a
cache keeps within its settings, and the worker runs as many tasks as before them."""

import asyncio
import gc
from pathlib import Path

from consumer.admission import KeyedSemaphores
from consumer.backends import BackendSettings
from consumer.backends.base import CloneJob, CloneResult
from consumer.handler import CancelRegistry
from consumer.pipeline import StageClock
from consumer.reference import ReferenceAudio, ReferenceSettings
from consumer.worker import OffsetTracker
from schemas.events import CloneRequest
from tests.fixtures.memory_kafka import MemoryKafka
from tests.fixtures.model import synthetic_voice, wav_bytes
from tests.fixtures.seed import SeedServer
from tests.fixtures.worker import (
    Outcomes,
    Requests,
    WorkerSettingsFactory,
    clone_request,
    running_worker,
)

REQUESTS = 60
TENANTS = 6
REFERENCES = 5
CACHED = 2  # references the worker may keep
ROOT = Path(__file__).resolve().parents[2]


KINDS = (
    CloneRequest,
    CloneJob,
    CloneResult,
    StageClock,
    ReferenceAudio,
    KeyedSemaphores,
    CancelRegistry,
    OffsetTracker,
)


def everything_alive(kind: type) -> list[object]:
    gc.collect()
    return [o for o in gc.get_objects() if type(o) is kind]


class Census:
    """What was alive of each kind before this test: earlier tests of the session may leave such
    objects behind (module-level samples, fixtures), and they are not this worker's. Held, so
    that no new object can take one's id."""

    def __init__(self) -> None:
        self._before = {kind: {id(o): o for o in everything_alive(kind)} for kind in KINDS}

    def new(self, kind: type) -> list[object]:
        """The objects of `kind` alive now that were not alive before."""
        return [o for o in everything_alive(kind) if id(o) not in self._before[kind]]


def worker_tasks() -> list[str]:
    """The running tasks of the worker's own code (libraries' come and go with connections and
    fetches), by coroutine name."""
    roots = tuple(str(ROOT / package) for package in ("consumer", "producer"))
    coroutines = [task.get_coro() for task in asyncio.all_tasks()]
    return sorted(c.__qualname__ for c in coroutines if c.cr_code.co_filename.startswith(roots))


def references(root: Path) -> list[str]:
    """Distinct reference files, so each is fetched and cached anew."""
    uris = []
    for n in range(REFERENCES):
        path = root / f"voice-{n}.wav"
        path.write_bytes(wav_bytes(synthetic_voice(seed=n)))
        uris.append(path.as_uri())
    return uris


async def test_no_request_state_outlives_its_request(
    make_memory_settings: WorkerSettingsFactory,
    memory_kafka: MemoryKafka,
    seed_server: SeedServer,
    reference_root: Path,
) -> None:
    settings = make_memory_settings(
        backend=BackendSettings(kind="http", http={"base_url": seed_server.url}),
        reference=ReferenceSettings(
            allowed_schemes=["file"], file_root=reference_root, cache_entries=CACHED
        ),
        max_in_flight=4,
    )
    census = Census()
    alive = census.new
    uris = references(reference_root)
    warmup = clone_request(uris[0])
    ids = []

    async with (
        Requests(settings, memory_kafka) as requests,
        Outcomes(settings, memory_kafka) as outcomes,
        running_worker(settings, memory_kafka),
    ):
        await requests.send(warmup)
        await outcomes.wait_for([warmup.request_id])
        del warmup
        tasks_before = worker_tasks()
        for n in range(REQUESTS):
            request = clone_request(uris[n % REFERENCES], tenant_id=f"tenant-{n % TENANTS}")
            await requests.send(request)
            if n % 10 == 0:
                await requests.cancel(request)
            ids.append(request.request_id)
        del request
        await outcomes.wait_for(ids, within_s=60)
        tasks_after = worker_tasks()

        assert alive(CloneRequest) == []
        assert alive(CloneJob) == []
        assert alive(CloneResult) == []
        assert alive(StageClock) == []
        assert len(alive(ReferenceAudio)) <= CACHED
        assert all(len(semaphores) == 0 for semaphores in alive(KeyedSemaphores))
        (registry,) = alive(CancelRegistry)
        assert registry._running == {}  # cancels are remembered, watchers are not
        for tracker in alive(OffsetTracker):
            assert all(not p.pending for p in tracker._partitions.values())
        assert tasks_before  # the worker's loops
        assert tasks_after == tasks_before
