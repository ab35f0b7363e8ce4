"""Semaphores by key: at most N holders per tenant, or one request per object key at a time."""

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass


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
