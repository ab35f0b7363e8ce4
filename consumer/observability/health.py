"""What `/readyz` answers from: `Health` reads it from the worker's parts when asked.

It reads the consume loop's facts (`LoopFacts`: partitions assigned, the loop's last poll, its
last offset commit), which the loop keeps as plain fields, whether the outcome producer reaches
the broker (the publisher's own state), and asks the backend, with a time limit. Nothing here
runs while requests are handled: `check()` turns what it reads into a verdict.

The `kafka` check fails while the worker cannot make progress with Kafka: outcomes not
acknowledged (within the broker timeout) or offset commits failing. That is for readiness, not
liveness: a restart does not bring a broker back, and a worker taken out of a Service loses
nothing (it serves no traffic through one), while its readiness is what operators watch.
"""

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiokafka import TopicPartition

from consumer.observability.settings import HttpServerSettings

BackendReady = Callable[[], Awaitable[bool]]
ProducerConnected = Callable[[], bool]
OK = "ok"


@dataclass
class LoopFacts:
    """What the consume loop knows that readiness asks about, kept by the loop as plain fields
    (nothing is called per poll or commit) and read by `Health` when `/readyz` is asked."""

    assigned: set[TopicPartition] = field(default_factory=set)
    # time.monotonic() (Health's clock) of the loop's last poll; None before its first.
    last_poll: float | None = None
    # Why the last offset commit failed; None once one succeeds or nothing is left to commit.
    commit_failure: str | None = None


def _not_built() -> bool:
    """Readiness's answer for a producer serve() has not built yet: not connected."""
    return False


@dataclass(frozen=True)
class Readiness:
    """The verdict and each check's answer: "ok", or why not."""

    checks: dict[str, str]

    @property
    def ready(self) -> bool:
        return all(answer == OK for answer in self.checks.values())


class Health:
    """Readiness, read when asked: the loop's facts, the producer, the backend."""

    def __init__(
        self,
        progress_timeout_seconds: float,
        backend_timeout_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._progress_timeout = progress_timeout_seconds
        self._backend_timeout = backend_timeout_seconds
        self._clock = clock
        # Where readiness reads from, pointed at each part by serve() once it is built; until
        # then the loop has not polled and the producer is not connected.
        self.loop_facts = LoopFacts()
        self.producer_connected: ProducerConnected = _not_built
        # None: the backend cannot be checked cheaply, so readiness does not ask.
        self.backend_ready: BackendReady | None = None

    @classmethod
    def from_settings(cls, settings: HttpServerSettings) -> "Health":
        return cls(settings.progress_timeout_seconds, settings.backend_check_timeout_seconds)

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
        return OK if self.loop_facts.assigned else "no partitions assigned"

    def _check_kafka(self) -> str:
        problems = []
        if not self.producer_connected():
            problems.append("producer not connected")
        if self.loop_facts.commit_failure is not None:
            problems.append(f"offset commit failed: {self.loop_facts.commit_failure}")
        return "; ".join(problems) or OK

    def _check_progress(self) -> str:
        if self.loop_facts.last_poll is None:
            return "the consume loop has not polled yet"
        idle = self._clock() - self.loop_facts.last_poll
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
