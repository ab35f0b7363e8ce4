"""A backend call that never answers: abandoned at the request's deadline (EXPIRED), the call
cancelled (the server sees its client go), the slot freed; other requests keep flowing meanwhile
on the worker's other slot. Kafka in memory: the broker adds nothing here."""

import asyncio
import time
from datetime import UTC, datetime, timedelta

from consumer.backends import BackendSettings
from schemas.events import AudioReady, CloneFailed, ErrorCode
from tests.fixtures.memory_kafka import MemoryKafka
from tests.fixtures.seed import SeedServer
from tests.fixtures.worker import (
    Outcomes,
    Requests,
    WorkerSettingsFactory,
    clone_request,
    running_worker,
)

HANG = "This sentence is never spoken."
DEADLINE_S = 4.0
OTHERS = 20
SLOW_S = 1.0  # the calls that show both slots free again


async def test_a_hung_call_expires_at_the_deadline_and_frees_its_slot(
    make_memory_settings: WorkerSettingsFactory,
    memory_kafka: MemoryKafka,
    seed_server: SeedServer,
    voice_uri: str,
) -> None:
    backend = BackendSettings(kind="http", http={"base_url": seed_server.url})
    settings = make_memory_settings(backend=backend, max_in_flight=2)
    seed_server.hang_text, seed_server.delay_seconds = HANG, 0.05
    deadline = datetime.now(UTC) + timedelta(seconds=DEADLINE_S)
    hung = clone_request(voice_uri, text=HANG, deadline=deadline)
    others = [clone_request(voice_uri) for _ in range(OTHERS)]
    slow = [clone_request(voice_uri) for _ in range(2)]

    async with (
        Requests(settings, memory_kafka) as requests,
        Outcomes(settings, memory_kafka) as outcomes,
        running_worker(settings, memory_kafka),
    ):
        await requests.send(hung)
        await asyncio.wait_for(seed_server.entered.wait(), 30)
        await requests.send(*others)
        await outcomes.wait_for([r.request_id for r in [hung, *others]], within_s=30)
        await asyncio.wait_for(seed_server.disconnected.wait(), 5)
        # Both slots free: two calls of SLOW_S each take SLOW_S together, not twice that.
        seed_server.delay_seconds = SLOW_S
        started = time.monotonic()
        await requests.send(*slow)
        await outcomes.wait_for([r.request_id for r in slow], within_s=30)
        both = time.monotonic() - started

    expired = outcomes.first(hung.request_id)
    assert isinstance(expired, CloneFailed)
    assert (expired.error_code, expired.retryable) == (ErrorCode.EXPIRED, False)
    assert deadline <= expired.failed_at < deadline + timedelta(seconds=2)
    for request in others:  # all answered while the hung call held the other slot
        answered = outcomes.first(request.request_id)
        assert isinstance(answered, AudioReady)
        assert answered.completed_at < deadline
    assert all(isinstance(outcomes.first(r.request_id), AudioReady) for r in slow)
    assert both < 2 * SLOW_S, f"the two calls took {both:.1f} s: one slot is still held"
