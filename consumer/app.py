"""Wiring: build every component from settings, start and stop them in pairs, run until a signal."""

import asyncio
import contextlib
import signal
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from consumer.backends import Backend, make_backend
from consumer.handler import CancelRegistry, CancelWatcher, RecordHandler
from consumer.observability.health import Health
from consumer.observability.server import ObservabilityServer
from consumer.pipeline import Pipeline
from consumer.reference import ReferenceFetcher
from consumer.settings import ProcessingGuarantee, WorkerSettings
from consumer.telemetry import Metrics, RequestTracing
from consumer.worker import Commits, PlainCommits, TransactionalCommits, Worker
from producer.kafka_clients import cancel_consumer, outcome_producer, worker_consumer
from producer.publisher import OutcomePublisher, OutcomeSink, PublisherHooks
from producer.storage import make_storage
from producer.transactions import TransactionalPublisher
from schemas.codec import Codec

log = structlog.get_logger(__name__)


class KafkaClients(Protocol):
    """The Kafka clients serve() opens, not started: built from the settings by default
    (`producer.kafka_clients`); tests give in-memory ones. The outcome producer is the at
    least once publisher's, or with a transactional id one of exactly once's (one per requests
    partition, made by its publisher as partitions are assigned)."""

    def requests_consumer(self) -> AIOKafkaConsumer: ...
    def cancel_consumer(self) -> AIOKafkaConsumer: ...
    def outcome_producer(self, transactional_id: str | None = None) -> AIOKafkaProducer: ...


@dataclass(frozen=True)
class _ClientsFromSettings:
    settings: WorkerSettings

    def requests_consumer(self) -> AIOKafkaConsumer:
        settings = self.settings
        return worker_consumer(
            settings.kafka,
            settings.group_id,
            settings.max_poll_interval_ms,
            settings.revoke_grace_seconds,
        )

    def cancel_consumer(self) -> AIOKafkaConsumer:
        return cancel_consumer(self.settings.kafka)

    def outcome_producer(self, transactional_id: str | None = None) -> AIOKafkaProducer:
        return outcome_producer(self.settings.kafka, transactional_id)


async def serve(
    settings: WorkerSettings,
    ready: asyncio.Event | None = None,
    backend: Backend | None = None,
    clients: KafkaClients | None = None,
    until_idle: bool = False,
) -> None:
    """Run one worker until SIGTERM/SIGINT or cancellation: stop fetching, drain in-flight
    requests within the grace period, commit, close. Cancellation is re-raised once drained.

    `ready` is set once every component has started and the cancel topic's lookback window
    has been read; the worker then joins its group.

    `backend` replaces the one `settings.backend` describes (a benchmark's or test's own).
    serve() owns it either way: it starts it and closes it on the way out, so pass one not
    started and do not use it after.

    `clients` replaces where its Kafka clients come from (a test's in-memory ones).

    `until_idle`: a one-shot batch job, which also returns once every request of its
    partitions is answered and committed (`Worker.run_until_idle`).
    """
    clients = clients if clients is not None else _ClientsFromSettings(settings)
    codec = settings.make_codec()
    metrics = Metrics()
    health = Health.from_settings(settings.http)
    async with AsyncExitStack() as stack:
        # First, so /healthz answers while a backend loads its model; closed last.
        await _serve_http(stack, settings, metrics, health)
        storage = make_storage(settings.storage)
        await storage.start()
        stack.push_async_callback(storage.close)
        backend = backend if backend is not None else make_backend(settings.backend)
        await backend.start()
        stack.push_async_callback(backend.close)
        health.backend_ready = backend.ready
        fetcher = ReferenceFetcher(settings.reference, object_reader=storage)
        stack.push_async_callback(fetcher.close)
        hooks = PublisherHooks(retried=metrics.retried)
        publisher, commits = _guarantee(settings, codec, hooks, clients)
        health.producer_connected = lambda: publisher.connected
        # Before start: a start that fails (Kafka unreachable) leaves a client to close.
        stack.push_async_callback(publisher.stop)
        await publisher.start()

        cancels = CancelRegistry(ttl_seconds=settings.cancel_lookback_seconds)
        watcher = CancelWatcher(
            clients.cancel_consumer,
            settings.topics.cancel,
            codec,
            cancels,
            settings.cancel_lookback_seconds,
        )
        await watcher.start()
        stack.push_async_callback(watcher.stop)

        pipeline = Pipeline(settings.limits, fetcher, backend, storage, metrics, settings.retry)
        tracing = RequestTracing() if settings.tracing_enabled else None
        handler = RecordHandler(
            codec, pipeline, publisher, cancels, metrics=metrics, tracing=tracing
        )
        consumer = clients.requests_consumer()
        worker = Worker(settings, consumer, handler, metrics, commits)
        health.loop_facts = worker.facts
        stack.enter_context(_stop_on_signals(worker.stop))
        log.info("worker_started", backend=backend.name, max_in_flight=settings.max_in_flight)
        if ready is not None:
            ready.set()
        await _run_to_completion(worker, until_idle)


def _guarantee(
    settings: WorkerSettings, codec: Codec, hooks: PublisherHooks, clients: KafkaClients
) -> tuple[OutcomeSink, Commits]:
    """The outcome publisher and the commits of the processing guarantee the settings ask for."""
    if settings.processing_guarantee is ProcessingGuarantee.EXACTLY_ONCE:
        prefix = settings.effective_transactional_id_prefix()
        log.info("exactly_once", transactional_id_prefix=prefix)
        if settings.transactional_id is not None:
            log.warning(
                "setting_ignored",
                setting="transactional_id",
                value=settings.transactional_id,
                reason="replaced by transactional_id_prefix, the same on every worker",
            )
        transactional = TransactionalPublisher(
            settings.kafka,
            settings.topics,
            codec,
            prefix,
            settings.group_id,
            hooks,
            make_producer=clients.outcome_producer,
        )
        return transactional, TransactionalCommits(transactional)
    publisher = OutcomePublisher(
        settings.kafka,
        settings.topics,
        codec,
        hooks=hooks,
        ack_timeout_seconds=settings.broker_timeout_seconds,
        producer=clients.outcome_producer(),
    )
    return publisher, PlainCommits(settings.broker_timeout_seconds)


async def _serve_http(
    stack: AsyncExitStack, settings: WorkerSettings, metrics: Metrics, health: Health
) -> None:
    """Serve /metrics, /healthz and /readyz until `stack` closes, unless turned off."""
    if settings.http.enabled:
        server = ObservabilityServer(settings.http, metrics, health)
        await server.start()
        stack.push_async_callback(server.stop)


async def _run_to_completion(worker: Worker, until_idle: bool) -> None:
    """Run the worker; when we are cancelled, stop it and wait for its drain, then re-raise.

    The worker runs in a task of its own so that its drain is not itself cancelled; a second
    cancellation while waiting does cut the drain short.
    """
    running = asyncio.create_task(worker.run(until_idle), name="worker")
    try:
        await asyncio.shield(running)
    except asyncio.CancelledError:
        worker.stop()
        await running
        raise


@contextlib.contextmanager
def _stop_on_signals(stop: Callable[[], None]) -> Iterator[None]:
    """Call `stop` on SIGTERM/SIGINT while the block runs; the previous handlers (say
    asyncio.run's own for SIGINT) are put back after."""
    loop = asyncio.get_running_loop()
    previous: dict[signal.Signals, Any] = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        handler = signal.getsignal(sig)
        # Not possible off the main thread or on Windows: then cancellation is the way to stop.
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop)
            previous[sig] = handler
    try:
        yield
    finally:
        for sig, handler in previous.items():
            loop.remove_signal_handler(sig)
            if handler is not None:  # None: set outside Python, nothing we can put back
                signal.signal(sig, handler)
