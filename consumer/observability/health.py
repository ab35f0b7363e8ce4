"""What `/readyz` answers from: a small object the worker keeps up to date.

The worker reports facts as they happen (partitions assigned or revoked, the consume loop
polled, the producer reaching the broker or not, offset commits done or failing); `check()`
turns them into a verdict, asking the backend only then, with a time limit.

The `kafka` check fails while the worker cannot make progress with Kafka: outcomes not
acknowledged (within the broker timeout) or offset commits failing. That is for readiness, not
liveness: a restart does not bring a broker back, and a worker taken out of a Service loses
nothing (it serves no traffic through one), while its readiness is what operators watch.
"""

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from aiokafka import TopicPartition

from consumer.observability.settings import HttpServerSettings

BackendReady = Callable[[], Awaitable[bool]]
OK = "ok"


@dataclass(frozen=True)
class Readiness:
    """The verdict and each check's answer: "ok", or why not."""

    checks: dict[str, str]

    @property
    def ready(self) -> bool:
        return all(answer == OK for answer in self.checks.values())


class Health:
    """Readiness facts: assigned partitions, the loop's last poll, producer, backend."""

    def __init__(
        self,
        progress_timeout_seconds: float,
        backend_timeout_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._progress_timeout = progress_timeout_seconds
        self._backend_timeout = backend_timeout_seconds
        self._clock = clock
        self._assigned: set[TopicPartition] = set()
        self._last_progress: float | None = None
        self.producer_connected = False
        self._commit_failure: str | None = None  # why the last offset commit failed
        # None: the backend cannot be checked cheaply, so readiness does not ask.
        self.backend_ready: BackendReady | None = None

    @classmethod
    def from_settings(cls, settings: HttpServerSettings) -> "Health":
        return cls(settings.progress_timeout_seconds, settings.backend_check_timeout_seconds)

    @property
    def assigned_partitions(self) -> frozenset[TopicPartition]:
        return frozenset(self._assigned)

    def assigned(self, partitions: Iterable[TopicPartition]) -> None:
        self._assigned.update(partitions)

    def revoked(self, partitions: Iterable[TopicPartition]) -> None:
        self._assigned.difference_update(partitions)

    def set_producer_connected(self, connected: bool) -> None:
        """The outcome producer started, reached the broker again, lost it or stopped."""
        self.producer_connected = connected

    def committed(self) -> None:
        """Offsets were committed, or there were none left to commit."""
        self._commit_failure = None

    def commit_failed(self, why: str) -> None:
        self._commit_failure = why

    def progressed(self) -> None:
        """The consume loop went round (polled, or finished a record)."""
        self._last_progress = self._clock()

    async def check(self) -> Readiness:
        return Readiness(
            {
                "partitions": self._check_partitions(),
                "progress": self._check_progress(),
                "kafka": self._check_kafka(),
                "backend": await self._check_backend(),
            }
        )

    def _check_partitions(self) -> str:
        return OK if self._assigned else "no partitions assigned"

    def _check_kafka(self) -> str:
        problems = []
        if not self.producer_connected:
            problems.append("producer not connected")
        if self._commit_failure is not None:
            problems.append(f"offset commit failed: {self._commit_failure}")
        return "; ".join(problems) or OK

    def _check_progress(self) -> str:
        if self._last_progress is None:
            return "the consume loop has not polled yet"
        idle = self._clock() - self._last_progress
        if idle > self._progress_timeout:
            return f"the consume loop last polled {idle:.0f} s ago"
        return OK

    async def _check_backend(self) -> str:
        if self.backend_ready is None:
            return OK
        try:
            async with asyncio.timeout(self._backend_timeout):
                reachable = await self.backend_ready()
        except TimeoutError:
            return f"backend check took over {self._backend_timeout:g} s"
        return OK if reachable else "backend not reachable"
