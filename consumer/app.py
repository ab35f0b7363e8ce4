"""Wiring: build every component from settings, start and stop them in pairs, run until a signal."""

import asyncio
import contextlib
import signal
from contextlib import AsyncExitStack

import structlog
from aiokafka import AIOKafkaConsumer

from consumer.backends import make_backend
from consumer.cancels import CancelRegistry, CancelWatcher
from consumer.handler import RecordHandler
from consumer.pipeline import Pipeline
from consumer.reference import ReferenceFetcher
from consumer.settings import WorkerSettings
from consumer.worker import Worker
from producer.publisher import OutcomePublisher
from producer.storage import make_storage
from schemas.codec import make_codec

log = structlog.get_logger(__name__)


async def serve(settings: WorkerSettings, ready: asyncio.Event | None = None) -> None:
    """Run one worker until SIGTERM/SIGINT (or cancellation): drain, commit, close, return."""
    codec = make_codec(settings.schema_registry_url)
    async with AsyncExitStack() as stack:
        storage = make_storage(settings.storage)
        await storage.start()
        stack.push_async_callback(storage.close)
        backend = make_backend(settings.backend)
        await backend.start()
        stack.push_async_callback(backend.close)
        fetcher = ReferenceFetcher(settings.reference, object_reader=storage)
        stack.push_async_callback(fetcher.close)
        publisher = OutcomePublisher(settings.kafka, settings.topics, codec)
        await publisher.start()
        stack.push_async_callback(publisher.stop)

        cancels = CancelRegistry(ttl_seconds=settings.cancel_lookback_seconds)
        watcher = CancelWatcher(
            _cancel_consumer(settings),
            settings.topics.cancel,
            codec,
            cancels,
            settings.cancel_lookback_seconds,
        )
        watching = asyncio.create_task(watcher.run(), name="cancel-watcher")
        stack.push_async_callback(_cancel_and_wait, watching)

        pipeline = Pipeline(settings.limits, fetcher, backend, storage)
        worker = Worker(settings, RecordHandler(codec, pipeline, publisher, cancels))
        _on_signals(worker.stop)
        if ready is not None:
            ready.set()
        log.info("worker_started", backend=backend.name, max_in_flight=settings.max_in_flight)
        await worker.run()


def _cancel_consumer(settings: WorkerSettings) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        bootstrap_servers=settings.kafka.bootstrap_servers,
        client_id=f"{settings.kafka.client_id}-cancels",
        group_id=None,
        enable_auto_commit=False,
    )


def _on_signals(stop: "callable[[], None]") -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop)


async def _cancel_and_wait(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
