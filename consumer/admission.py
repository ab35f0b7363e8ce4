"""When a request may run, and until when: its deadline, and the tenant admission.

A request's `Deadline` is read once from its UTC deadline; every stage measures the time left
on it, and a request past it fails with the one EXPIRED error (`Expired`).

At most `limits.max_in_flight_per_tenant` requests of one tenant run at once; the others wait
for their tenant's turn in arrival order. The consume loop owns the admission: it counts the
waiting records (`waiting`) as holding no slot of `max_in_flight`, so a tenant with a backlog
cannot fill the worker and starve the others, and holds at most `max_waiting` of them. It hands
its admission forward with each record it starts; the pipeline takes the turn once the request
is checked (an invalid request is refused at once, whatever its tenant's load) and holds it
while the work runs. A request waits at most until its deadline, then expires. The places are
semaphores by key (`KeyedSemaphores`), which the pipeline also uses for one request per object
key at a time.
"""

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Self

from schemas.vocabulary import ErrorCode, VoicecloneError

# -- the request's deadline ------------------------------------------------------------------------


class Expired(VoicecloneError):
    """The request's deadline passed before its audio was ready."""

    code = ErrorCode.EXPIRED

    def __init__(self) -> None:
        super().__init__("the request's deadline passed")


@dataclass(frozen=True)
class Deadline:
    """When a request stops being useful, as a `time.monotonic()` value (None: never).

    Read from the request's UTC deadline once, so every stage measures the same time left on a
    clock that wall-clock adjustments do not move.
    """

    at: float | None

    @classmethod
    def of(cls, deadline: datetime | None) -> Self:
        """The deadline a request's `deadline` field states."""
        if deadline is None:
            return cls(None)
        return cls(time.monotonic() + (deadline - datetime.now(UTC)).total_seconds())

    def remaining(self) -> float | None:
        """Seconds left (zero or less once passed); None without a deadline."""
        return None if self.at is None else self.at - time.monotonic()

    @property
    def expired(self) -> bool:
        left = self.remaining()
        return left is not None and left <= 0

    def check(self) -> None:
        """Raise `Expired` if the deadline has passed."""
        if self.expired:
            raise Expired()

    def budget(self, limit: float) -> float:
        """Seconds one call may take: the time left, capped by `limit` (the callee's own bound).

        Raises `Expired` when no time is left, so no work starts for an expired request.
        """
        left = self.remaining()
        if left is None:
            return limit
        if left <= 0:
            raise Expired()
        return min(left, limit)


# -- semaphores by key -----------------------------------------------------------------------------


def _nobody() -> None:
    """The default `on_wait`: nobody listens."""


@dataclass
class _Entry:
    semaphore: asyncio.Semaphore
    users: int = 0  # holding or waiting


class KeyedSemaphores:
    """At most `limit` holders per key; the others wait in arrival order.

    A key's semaphore exists only while someone holds or waits for it, so the table stays as
    small as the work in flight however many keys pass through.
    """

    def __init__(self, limit: int, on_wait: Callable[[], None] = _nobody) -> None:
        self.limit = limit
        self.on_wait = on_wait  # called as a caller starts to block
        self.waiting = 0  # callers blocked in `acquire` now, all keys together
        self._entries: dict[str, _Entry] = {}

    async def acquire(self, key: str, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Take one of `key`'s places; `TimeoutError` after `timeout` seconds (None: wait)."""
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry(asyncio.Semaphore(self.limit))
        entry.users += 1
        self.waiting += 1
        if entry.semaphore.locked():
            self.on_wait()
        try:
            async with asyncio.timeout(timeout):
                await entry.semaphore.acquire()
        except BaseException:  # timed out or cancelled: the place was never taken
            self._leave(key, entry)
            raise
        finally:
            self.waiting -= 1

    def release(self, key: str) -> None:
        entry = self._entries[key]
        entry.semaphore.release()
        self._leave(key, entry)

    @asynccontextmanager
    async def hold(self, key: str, timeout: float | None = None) -> AsyncIterator[None]:  # noqa: ASYNC109
        await self.acquire(key, timeout)
        try:
            yield
        finally:
            self.release(key)

    def __len__(self) -> int:
        """Keys held or waited for now."""
        return len(self._entries)

    def _leave(self, key: str, entry: _Entry) -> None:
        entry.users -= 1
        if entry.users == 0:
            del self._entries[key]


# -- tenant admission ------------------------------------------------------------------------------


class TenantAdmission:
    """At most `limit` running requests per tenant (None: no limit); `on_wait` is called as a
    request starts to wait, so its owner can give the record's slot to another."""

    def __init__(self, limit: int | None, on_wait: Callable[[], None] = lambda: None) -> None:
        self._tenants = KeyedSemaphores(limit, on_wait) if limit is not None else None

    @property
    def waiting(self) -> int:
        """Requests waiting for their tenant's turn now."""
        return 0 if self._tenants is None else self._tenants.waiting

    @asynccontextmanager
    async def turn(self, tenant_id: str, seconds_left: float | None) -> AsyncIterator[None]:
        """Hold one of the tenant's places while the block runs, waiting while it has none free
        for at most `seconds_left` (until the request's deadline; None: no deadline)."""
        if self._tenants is None:
            yield
            return
        try:
            await self._tenants.acquire(tenant_id, timeout=seconds_left)
        except TimeoutError:
            raise Expired() from None
        try:
            yield
        finally:
            self._tenants.release(tenant_id)


# For a request run outside a consume loop (a test's, a benchmark's): it never waits.
UNLIMITED = TenantAdmission(None)
