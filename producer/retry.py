"""Waiting out outages: repeat an operation while its error says a later attempt may succeed."""

import asyncio
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

import structlog

from schemas.errors import EventCodecError

log = structlog.get_logger(__name__)

T = TypeVar("T")

# Why an operation was retried, as reported to `on_retry` callers (the worker counts them).
BROKER_OUTAGE: Final = "publish"
SCHEMA_REGISTRY_OUTAGE: Final = "schema_registry"


async def retry_while(
    transient: Callable[[Exception], bool],
    attempt: Callable[[], Awaitable[T]],
    *,
    backoff_seconds: float,
    what: str,
    on_retry: Callable[[], None] | None = None,
) -> T:
    """`await attempt()` until it succeeds, or fails with an error `transient` rejects (raised).
    `on_retry` is called after each failed attempt that will be repeated.

    No limit on attempts: callers use it where giving up would lose a request, and bound it
    from outside (shutdown cancels the wait).
    """
    while True:
        try:
            return await attempt()
        except Exception as exc:
            if not transient(exc):
                raise
            log.warning("retrying", what=what, error=type(exc).__name__)
            if on_retry is not None:
                on_retry()
        await asyncio.sleep(backoff_seconds)


def codec_outage(exc: Exception) -> bool:
    """A codec error that is an outage (of the schema registry), not a bad record or event."""
    return isinstance(exc, EventCodecError) and exc.retryable
