"""What `/readyz` answers from: a small object the worker keeps up to date.

The worker reports facts as they happen (partitions assigned or revoked, the consume loop
polled, the producer started or stopped); `check()` turns them into a verdict, asking the
backend only then, with a time limit.
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

    def progressed(self) -> None:
        """The consume loop went round (polled, or finished a record)."""
        self._last_progress = self._clock()

    async def check(self) -> Readiness:
        return Readiness(
            {
                "partitions": self._check_partitions(),
                "progress": self._check_progress(),
                "producer": OK if self.producer_connected else "producer not connected",
                "backend": await self._check_backend(),
            }
        )

    def _check_partitions(self) -> str:
        return OK if self._assigned else "no partitions assigned"

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
