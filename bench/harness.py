"""The worker under benchmark: `consumer.app.serve()` itself, with a fixture backend.

serve() is given the benchmark's backend in place of the one its settings describe (it starts
and closes it). Every other component is the one production builds, from the same settings.
"""

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import consumer.app
from consumer.backends import Backend
from consumer.observability.settings import HttpServerSettings
from consumer.reference import ReferenceSettings
from consumer.settings import WorkerSettings
from producer.settings import KafkaSettings
from producer.storage import StorageSettings
from schemas.topics import Topics

_START_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 60.0


def worker_settings(
    bootstrap: str,
    topics: Topics,
    workdir: Path,
    max_in_flight: int,
    storage_root: Path | None = None,
) -> WorkerSettings:
    """Production defaults except: these topics and a fresh group, local storage (under
    `storage_root`, default `workdir`/audio), file references under `workdir`, and no HTTP
    server (no port to collide with)."""
    return WorkerSettings(
        kafka=KafkaSettings(bootstrap_servers=bootstrap, client_id="bench"),
        topics=topics,
        group_id=f"bench-{uuid.uuid4().hex[:12]}",
        max_in_flight=max_in_flight,
        storage=StorageSettings(kind="local", local_root=storage_root or workdir / "audio"),
        reference=ReferenceSettings(allowed_schemes=["file"], file_root=workdir),
        http=HttpServerSettings(enabled=False),
    )


@contextlib.asynccontextmanager
async def running_worker(
    settings: WorkerSettings, backend: Backend
) -> AsyncIterator[asyncio.Task[None]]:
    """serve() in a task (yielded), started: it then joins its group. Cancelled and drained
    when the block ends."""
    ready = asyncio.Event()
    task = asyncio.create_task(consumer.app.serve(settings, ready, backend), name="bench-serve")
    started = asyncio.create_task(ready.wait())
    await asyncio.wait(
        {task, started}, timeout=_START_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
    )
    started.cancel()
    if task.done():
        task.result()  # raises why it could not start
        raise RuntimeError("serve() returned before it was ready")
    try:
        if not ready.is_set():
            raise RuntimeError(f"the worker did not start within {_START_TIMEOUT_S:g} s")
        yield task
    finally:
        task.cancel()
        async with asyncio.timeout(_STOP_TIMEOUT_S):
            with contextlib.suppress(asyncio.CancelledError):
                await task
