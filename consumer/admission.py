"""Tenant admission: which of the records the consume loop started run now, and which wait.

At most `limits.max_in_flight_per_tenant` requests of one tenant run at once; the others wait
for their tenant's turn in arrival order. The consume loop owns the admission: it counts the
waiting records (`waiting`) as holding no slot of `max_in_flight`, so a tenant with a backlog
cannot fill the worker and starve the others, and holds at most `max_waiting` of them. It hands
its admission forward with each record it starts; the pipeline takes the turn once the request
is checked (an invalid request is refused at once, whatever its tenant's load) and holds it
while the work runs. A request waits at most until its deadline, then expires.
"""

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from consumer.concurrency import KeyedSemaphores
from consumer.deadline import Expired


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
