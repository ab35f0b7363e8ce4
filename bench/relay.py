"""The baseline: a raw aiokafka relay, consume → produce → commit, nothing in between.

It reads the same requests topic the worker reads and writes each record, as it is, to the
topic the worker writes outcomes to, with the worker's own Kafka settings (the consumer's of
consumer/worker.py, the producer's of producer/publisher.py) and the same guarantee: offsets
are committed only once the broker acknowledged what was produced. At most `max_in_flight`
records are fetched at a time, the bound the worker runs under. What the worker adds beyond
this is the cost of being the worker.
"""

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from schemas.topics import Topics


class Relay:
    def __init__(self, bootstrap: str, topics: Topics, max_in_flight: int) -> None:
        self._source = topics.requests
        self._sink = topics.audio_ready
        self._max_in_flight = max_in_flight
        self._consumer = AIOKafkaConsumer(
            self._source,
            bootstrap_servers=bootstrap,
            client_id="bench-relay",
            group_id=f"bench-relay-{uuid.uuid4().hex[:12]}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
        )
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            client_id="bench-relay",
            acks="all",
            enable_idempotence=True,
            linger_ms=2,
        )

    async def run(self) -> None:
        """Relay until cancelled."""
        while True:
            batch = await self._consumer.getmany(timeout_ms=200, max_records=self._max_in_flight)
            acks = [
                await self._producer.send(self._sink, r.value, key=r.key, headers=list(r.headers))
                for records in batch.values()
                for r in records
            ]
            if acks:
                await asyncio.gather(*acks)
                await self._consumer.commit()

    async def start(self) -> None:
        await self._producer.start()
        await self._consumer.start()

    async def stop(self) -> None:
        await self._consumer.stop()
        await self._producer.stop()


@contextlib.asynccontextmanager
async def running_relay(
    bootstrap: str, topics: Topics, max_in_flight: int
) -> AsyncIterator[asyncio.Task[None]]:
    """A relay running in a task (yielded) while the block runs."""
    relay = Relay(bootstrap, topics, max_in_flight)
    await relay.start()
    task = asyncio.create_task(relay.run(), name="bench-relay")
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await relay.stop()
