"""Trying again: the one retry loop of the project, and when to give up.

An operation is repeated while its error says a later attempt may succeed (`transient`), with
exponentially growing, jittered waits, until a `RetryPolicy` bound says stop: attempts, total
time, or the caller's deadline. What is raised is always the operation's own last error.

Why here, in producer/: the worker's stages (consumer/pipeline.py), its handler, settings and
metrics use it, and so does the outcome publisher (producer/publisher.py), which the client
library shares. Imports flow consumer -> producer -> schemas, so the lowest package among its
users is its home; schemas/ holds the contracts and their codecs, with no I/O to retry.
"""

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, TypeVar

import structlog

from schemas.errors import EventCodecError

log = structlog.get_logger(__name__)

T = TypeVar("T")

# Why an operation was retried, as reported to `on_retry` callers (the worker counts them).
BROKER_OUTAGE: Final = "publish"
SCHEMA_REGISTRY_OUTAGE: Final = "schema_registry"


@dataclass(frozen=True)
class RetryPolicy:
    """How long to wait between attempts and when to stop trying."""

    max_attempts: int | None = None  # None: no bound
    max_seconds: float | None = None  # no attempt starts this long after the first; None: none
    initial_backoff_seconds: float = 0.5
    max_backoff_seconds: float = 30.0
    multiplier: float = 2.0
    # Spread the waits of many callers that failed together (an outage), so they do not all
    # come back at once: each wait is drawn between half its nominal length and all of it.
    jitter: bool = True

    @classmethod
    def constant(cls, backoff_seconds: float) -> "RetryPolicy":
        """Forever, waiting the same time between attempts."""
        return cls(
            initial_backoff_seconds=backoff_seconds,
            max_backoff_seconds=backoff_seconds,
            multiplier=1.0,
            jitter=False,
        )

    def backoff(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (1: the second attempt)."""
        nominal = min(
            self.max_backoff_seconds,
            self.initial_backoff_seconds * self.multiplier ** (retry - 1),
        )
        if not self.jitter:
            return nominal
        return nominal / 2 + random.uniform(0, nominal / 2)

    def allows(self, attempts: int, started: float, wait: float, deadline: float | None) -> bool:
        """Whether another attempt may start `wait` seconds from now, after `attempts` tries
        that began at `started` (times from `time.monotonic()`)."""
        next_start = time.monotonic() + wait
        if self.max_attempts is not None and attempts >= self.max_attempts:
            return False
        if self.max_seconds is not None and next_start - started > self.max_seconds:
            return False
        return deadline is None or next_start < deadline


async def retry(
    attempt: Callable[[], Awaitable[T]],
    *,
    transient: Callable[[Exception], bool],
    policy: RetryPolicy,
    what: str,
    on_retry: Callable[[], None] | None = None,
    deadline: float | None = None,
) -> T:
    """`await attempt()` until it succeeds; raise its error when `transient` rejects it or the
    policy (or `deadline`, a `time.monotonic()` value) allows no further attempt.

    `on_retry` is called after each failed attempt that is to be repeated, before the wait.
    """
    started = time.monotonic()
    attempts = 0
    while True:
        attempts += 1
        try:
            return await attempt()
        except Exception as exc:
            wait = policy.backoff(attempts)
            if not transient(exc) or not policy.allows(attempts, started, wait, deadline):
                raise
            log.warning(
                "retrying",
                what=what,
                error=type(exc).__name__,
                attempt=attempts,
                backoff_seconds=round(wait, 3),
            )
            if on_retry is not None:
                on_retry()
            await asyncio.sleep(wait)
            # A loaded loop can wake the sleep late, past a bound the wait itself fitted in.
            if not policy.allows(attempts, started, 0, deadline):
                raise


async def retry_while(
    transient: Callable[[Exception], bool],
    attempt: Callable[[], Awaitable[T]],
    *,
    backoff_seconds: float,
    what: str,
    on_retry: Callable[[], None] | None = None,
) -> T:
    """`await attempt()` until it succeeds, or fails with an error `transient` rejects (raised).

    No limit on attempts: callers use it where giving up would lose a request, and bound it
    from outside (shutdown cancels the wait).
    """
    return await retry(
        attempt,
        transient=transient,
        policy=RetryPolicy.constant(backoff_seconds),
        what=what,
        on_retry=on_retry,
    )


def codec_outage(exc: Exception) -> bool:
    """A codec error that is an outage (of the schema registry), not a bad record or event."""
    return isinstance(exc, EventCodecError) and exc.transient
