"""Consumer lag per assigned partition, measured beside the consume loop.

Lag here is the records of a partition not finished yet: those not fetched (end offset minus
position) plus those in flight. The end offsets come from the broker (ListOffsets, the
consumer's isolation level), not from fetch responses, so lag keeps growing in the metric while
the worker is full and has paused every partition. It runs as its own task because looking up a
position can wait for the group, which the consume loop must never do.
"""

import asyncio
from collections.abc import Callable

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import IllegalStateError, KafkaError

from consumer.telemetry import Metrics

log = structlog.get_logger(__name__)

InFlight = Callable[[TopicPartition], int]


async def measure_lag(consumer: AIOKafkaConsumer, in_flight: InFlight) -> dict[TopicPartition, int]:
    """Unfinished records per assigned partition; partitions revoked meanwhile are left out."""
    assigned = sorted(consumer.assignment())
    if not assigned:
        return {}
    ends = await consumer.end_offsets(assigned)
    lag = {}
    for tp in assigned:
        try:
            position = await consumer.position(tp)
        except IllegalStateError:  # revoked while we looked
            continue
        lag[tp] = max(0, ends[tp] - position) + in_flight(tp)
    return lag


class LagMonitor:
    """Sets `voiceclone_consumer_lag_records` every `interval_seconds` until cancelled."""

    def __init__(self, metrics: Metrics, interval_seconds: float = 10.0) -> None:
        self._metrics = metrics
        self._interval = interval_seconds

    async def run(self, consumer: AIOKafkaConsumer, in_flight: InFlight) -> None:
        while True:
            try:
                await self.update(consumer, in_flight)
            except Exception:
                # A defect here must not end lag reporting unnoticed (nobody awaits this task
                # until shutdown): log it, try again next round.
                log.exception("lag_monitor_failed")
            await asyncio.sleep(self._interval)

    async def update(self, consumer: AIOKafkaConsumer, in_flight: InFlight) -> None:
        try:
            lag = await measure_lag(consumer, in_flight)
        except KafkaError as exc:
            # A stale value until the next round beats a crashed worker.
            log.warning("lag_unavailable", error=repr(exc))
            return
        still_assigned = consumer.assignment()
        for tp, records in lag.items():
            # A revocation during the lookup has already dropped the series: keep it dropped.
            if tp in still_assigned:
                self._metrics.set_lag(tp.topic, tp.partition, records)
