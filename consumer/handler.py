"""One record, start to finish: decode, run the pipeline (cancellable), publish the outcome.

`handle` returns only after an outcome or a dead letter is acknowledged by the broker (exactly
once: staged for the transaction that commits the record's offset), and never raises for a bad
message: unreadable input, unexpected failures and outcomes the broker refuses go to the
dead-letter topic with the original bytes, so nothing is lost and the loop goes on.
Transient failures are retried inside the pipeline, stage by stage; a clone-failed event says
how many times the failing stage was tried (`attempts`).

Invalid requests are answered, not dead-lettered. The event model (schemas/events.py) is the
one place for the rules a request must follow; when a request that was read breaks one (a NaN
temperature, an empty voice_id), the codec's EventDecodeError carries the record it read, and
if the request's header (ids, model, creation time, metadata; `RequestHeader`, same types)
validates, the sender gets a clone-failed INVALID_REQUEST naming the invalid fields, counted
and logged as any failed request. Only a record that cannot be read, or whose ids are empty
(an answer would address nobody), goes to the DLQ.

Unknown languages. The schema lets writers add enum symbols and tells readers to map ones they
do not know to the default (AUTO: the model detects the language), so a request from a producer
on a newer schema is served, not refused. That needs the writer's schema: with a Schema Registry
the worker fetches it by id; in schemaless mode it must be one this worker ships, and a record
written with a schema it has never seen (`unknown_schema`), or naming a symbol its own schema
lacks (`corrupt`), is dead-lettered. A registry outage is waited out, never dead-lettered.

The module reads from cancellation (the registry of cancelled requests and the watcher that
feeds it from the cancel topic) up to the handler, which asks the registry.
"""

import asyncio
import contextlib
import functools
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from opentelemetry.trace import INVALID_SPAN, Span
from pydantic import ValidationError

from consumer.admission import UNLIMITED, TenantAdmission
from consumer.errors import CloneError
from consumer.pipeline import Pipeline
from consumer.telemetry import HANDLER_ERROR, Metrics, RequestTracing, mark_outcome, outcome_headers
from producer.follow import assign_since
from producer.publisher import DeadLetter, OutcomeSink, RecordSource
from producer.retry import SCHEMA_REGISTRY_OUTAGE, codec_outage, retry_while
from schemas.codec import Codec, EventDecodeError
from schemas.events import (
    SAFE_ID_PATTERN,
    AudioReady,
    CloneCancel,
    CloneFailed,
    CloneRequest,
    RequestHeader,
)
from schemas.vocabulary import ErrorCode, VoicecloneError

log = structlog.get_logger(__name__)

# --- cancellation ---------------------------------------------------------------------------------
# Every worker follows the cancel topic and stops the requests it holds.
#
# The cancel topic is read without a consumer group, so each worker sees every cancel; on start
# it reads back `cancel_lookback_seconds` to the topic's end before the worker takes any
# request, so a cancel sent just before a restart still counts. Cancelled ids are remembered
# (bounded, with a time to live) so a cancel that arrives before its request is fetched still
# wins.


class Cancelled(VoicecloneError):
    """A clone-cancel event named the request before its audio was ready."""

    code = ErrorCode.CANCELLED

    def __init__(self) -> None:
        super().__init__("cancelled by a clone-cancel event")


RequestKey = tuple[str, str]  # (tenant_id, request_id): one tenant cannot cancel another's work


class CancelRegistry:
    """Remembers cancelled requests and signals the in-flight ones."""

    def __init__(self, ttl_seconds: float = 3600, max_entries: int = 100_000) -> None:
        self._ttl = ttl_seconds
        self._max = max_entries
        self._cancelled: OrderedDict[RequestKey, float] = OrderedDict()
        # Called when a running request is cancelled: its event's `set`, and what stops it.
        self._running: dict[RequestKey, list[Callable[[], object]]] = {}

    def __len__(self) -> int:
        """Cancels remembered (expired ones included until evicted)."""
        return len(self._cancelled)

    def cancel(self, tenant_id: str, request_id: str) -> None:
        key = (tenant_id, request_id)
        self._cancelled[key] = time.monotonic() + self._ttl
        self._cancelled.move_to_end(key)
        while len(self._cancelled) > self._max:
            self._cancelled.popitem(last=False)
        for callback in list(self._running.get(key, ())):
            callback()

    def is_cancelled(self, tenant_id: str, request_id: str) -> bool:
        expires = self._cancelled.get((tenant_id, request_id))
        return expires is not None and expires > time.monotonic()

    @contextlib.contextmanager
    def watch(
        self, tenant_id: str, request_id: str, on_cancel: Callable[[], object] | None = None
    ) -> Iterator[asyncio.Event]:
        """An event set when this request is cancelled while the block runs (at once if it
        already was); `on_cancel` is called then too, so the caller can stop its work directly
        rather than keep a task waiting on the event (bench/)."""
        key = (tenant_id, request_id)
        event = asyncio.Event()
        callbacks = [event.set, *([on_cancel] if on_cancel is not None else [])]
        running = self._running.setdefault(key, [])
        running.extend(callbacks)
        try:
            if self.is_cancelled(*key):
                for callback in callbacks:
                    callback()
            yield event
        finally:
            for callback in callbacks:
                running.remove(callback)
            if not running:
                del self._running[key]


class CancelWatcher:
    """Feeds the cancel topic into a registry: `start` catches up, then a task follows it.

    A failure while following (a broker or registry outage) is logged and the topic reopened
    after a pause, reading the lookback window again; a failure in `start` is raised, so a
    worker that cannot see cancels does not start.
    """

    def __init__(
        self,
        make_consumer: Callable[[], AIOKafkaConsumer],
        topic: str,
        codec: Codec,
        registry: CancelRegistry,
        lookback_seconds: float,
        retry_seconds: float = 5.0,
        poll_timeout_ms: int = 1000,
    ) -> None:
        self._make_consumer = make_consumer
        self._topic = topic
        self._codec = codec
        self._registry = registry
        self._lookback = lookback_seconds
        self._retry_seconds = retry_seconds
        self._poll_timeout_ms = poll_timeout_ms
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Apply every cancel of the lookback window, then follow the topic in the background."""
        if self._task is None:
            consumer = await self._open()
            self._task = asyncio.create_task(self._follow(consumer), name="cancel-watcher")

    async def stop(self) -> None:
        """Stop following; safe to call twice."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _follow(self, consumer: AIOKafkaConsumer | None) -> None:
        while True:
            try:
                consumer = consumer or await self._open()
                while consumer.assignment():  # none: the topic was missing; look again later
                    await self._poll(consumer)
            except Exception:
                log.exception("cancel_watcher_failed")
            finally:
                if consumer is not None:
                    await consumer.stop()
                    consumer = None
            await asyncio.sleep(self._retry_seconds)

    async def _open(self) -> AIOKafkaConsumer:
        """A consumer of the cancel topic whose lookback window has been applied."""
        consumer = self._make_consumer()
        await consumer.start()
        try:
            since = datetime.fromtimestamp(time.time() - self._lookback, UTC)
            if await assign_since(consumer, [self._topic], since):
                await self._read_to_end(consumer)
            else:
                log.warning("cancel_topic_missing", topic=self._topic)
        except BaseException:
            await consumer.stop()
            raise
        return consumer

    async def _read_to_end(self, consumer: AIOKafkaConsumer) -> None:
        ends = await consumer.end_offsets(list(consumer.assignment()))
        while await _behind(consumer, ends):
            await self._poll(consumer)
        log.info("cancels_caught_up", remembered=len(self._registry))

    async def _poll(self, consumer: AIOKafkaConsumer) -> None:
        batch = await consumer.getmany(timeout_ms=self._poll_timeout_ms)
        for records in batch.values():
            for record in records:
                await self._apply(record.topic, record.value, record.headers)

    async def _apply(
        self, topic: str, value: bytes | None, headers: Sequence[tuple[str, bytes]]
    ) -> None:
        try:
            event = await self._codec.decode(topic, value, headers)
        except EventDecodeError as exc:
            if exc.transient:  # a registry outage: reopening later reads this cancel again
                raise
            log.warning("cancel_undecodable", reason=exc.reason)
            return
        if isinstance(event, CloneCancel):
            log.info("cancel_received", request_id=event.request_id)
            self._registry.cancel(event.tenant_id, event.request_id)


async def _behind(consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int]) -> bool:
    """Whether some partition's position is still short of the end offset taken at start."""
    for tp, end in ends.items():
        if await consumer.position(tp) < end:
            return True
    return False


# --- one record -----------------------------------------------------------------------------------


class RecordHandler:
    """Handles one clone-request record at a time; many run concurrently.

    Outcomes and dead letters are counted in `metrics` once the broker acknowledged them (by
    default metrics nobody exports, for callers that do not look at them). With `tracing`, each
    decoded request gets a span (`consumer.telemetry`) that its outcome's headers name; without,
    the outcome carries the request's own trace headers.
    """

    def __init__(
        self,
        codec: Codec,
        pipeline: Pipeline,
        publisher: OutcomeSink,
        cancels: CancelRegistry,
        decode_retry_seconds: float = 1.0,
        metrics: Metrics | None = None,
        tracing: RequestTracing | None = None,
    ) -> None:
        self._codec = codec
        self._pipeline = pipeline
        self._publisher = publisher
        self._cancels = cancels
        self._decode_retry_seconds = decode_retry_seconds
        self._metrics = metrics if metrics is not None else Metrics.unexported()
        self._tracing = tracing

    async def handle(self, record: ConsumerRecord, admission: TenantAdmission = UNLIMITED) -> None:
        """Answer `record`; its request runs when `admission` (the consume loop's) lets it."""
        log_ = log.bind(partition=record.partition, offset=record.offset)
        try:
            request = await self._decode(record)
        except EventDecodeError as exc:
            header = _answerable(exc)
            if header is None:
                # The reason only: a decoder's message may quote the record's bytes.
                log_.warning("dead_letter", reason=exc.reason)
                await self._publisher.dead_letter(_dead_letter(record, exc))
                self._metrics.dead_lettered(str(exc.reason))
                return
            await self._answer(record, header, functools.partial(_refuse, exc), log_)
            return
        work = lambda: self._cancellable(request, admission)  # noqa: E731
        await self._answer(record, request, work, log_)

    async def _answer(
        self,
        record: ConsumerRecord,
        request: CloneRequest | RequestHeader,
        work: Callable[[], Awaitable[AudioReady]],
        log_: structlog.typing.FilteringBoundLogger,
    ) -> None:
        """Publish the outcome of `work` for `request`: its audio, or the CloneError it raised."""
        log_ = log_.bind(request_id=_loggable(request.request_id))
        model = request.model.size
        with self._traced(record, request) as span:
            try:
                outcome, fields = await _outcome(request, work)
                headers = outcome_headers(record.headers)  # naming the request's span
                with self._metrics.stage("publish", model):
                    await self._publisher.publish(outcome, headers, _source(record))
            except Exception as exc:
                # A defect, or an outcome the broker refuses: keep the original for replay.
                log_.exception("handler_failed")
                await self._publisher.dead_letter(_dead_letter(record, exc))
                self._metrics.dead_lettered(HANDLER_ERROR, model)
                mark_outcome(span, None, HANDLER_ERROR)
                return
            mark_outcome(span, outcome)
        self._metrics.outcome_published(request, outcome)
        log_.info("outcome_published", outcome=type(outcome).__name__, **fields)

    def _traced(
        self, record: ConsumerRecord, request: CloneRequest | RequestHeader
    ) -> contextlib.AbstractContextManager[Span]:
        """The request's span while it is handled; the API's invalid span when not traced."""
        if self._tracing is None:
            return contextlib.nullcontext(INVALID_SPAN)
        ids = _loggable(request.request_id), _loggable(request.tenant_id)
        return self._tracing.request(record, *ids, request.model.size)

    async def _decode(self, record: ConsumerRecord) -> CloneRequest:
        """The request in `record`; waits out a schema registry outage."""
        event = await retry_while(
            codec_outage,
            lambda: self._codec.decode(record.topic, record.value, record.headers),
            backoff_seconds=self._decode_retry_seconds,
            what="decoding a request",
            on_retry=functools.partial(self._metrics.retried, SCHEMA_REGISTRY_OUTAGE),
        )
        if not isinstance(event, CloneRequest):
            raise EventDecodeError(
                "wrong_type", f"expected CloneRequest, got {type(event).__name__}"
            )
        return event

    async def _cancellable(self, request: CloneRequest, admission: TenantAdmission) -> AudioReady:
        """Run the pipeline in a task that a cancel event for this request cancels, waiting
        for its tenant's turn included."""
        if self._cancels.is_cancelled(request.tenant_id, request.request_id):
            raise _cancelled()  # cancelled while queued: never start the work
        work = asyncio.ensure_future(self._pipeline.process(request, admission))
        with self._cancels.watch(request.tenant_id, request.request_id, on_cancel=work.cancel):
            try:
                # Our own cancellation (shutdown) cancels the work too, and waits for it.
                return await work
            except asyncio.CancelledError:
                if work.cancelled() and not _being_cancelled():
                    raise _cancelled() from None
                raise


async def _outcome(
    request: CloneRequest | RequestHeader, work: Callable[[], Awaitable[AudioReady]]
) -> tuple[AudioReady | CloneFailed, dict[str, object]]:
    """The outcome, and what its log line says beyond its type."""
    try:
        ready = await work()
    except CloneError as exc:
        return _failed(request, exc), _failed_fields(exc)
    return ready, _ready_fields(ready)


def _answerable(error: EventDecodeError) -> RequestHeader | None:
    """The header of a request that was read but is invalid, when it can be answered."""
    if error.event_type is not CloneRequest or error.record is None:
        return None
    try:
        return RequestHeader.model_validate(error.record)
    except ValidationError:
        return None


async def _refuse(error: EventDecodeError) -> AudioReady:
    """The work an invalid request gets: none. The codec's message names the invalid fields
    without quoting them, so the sender learns what to fix and nothing leaks."""
    raise CloneError(error)  # INVALID_REQUEST


def _loggable(request_id: str) -> str:
    """The id as logs may show it: one the pipeline will refuse (it may hold newlines or be
    huge) is shown quoted and cut short."""
    if re.fullmatch(SAFE_ID_PATTERN, request_id):
        return request_id
    return repr(request_id[:64])


def _being_cancelled() -> bool:
    """Whether the running task itself was asked to stop (shutdown, revocation)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _cancelled() -> CloneError:
    return CloneError(Cancelled())


# A request's one INFO line carries its stage timings (never its text): one line per stage
# cost the event loop a fifth of its time (bench/).
def _ready_fields(ready: AudioReady) -> dict[str, object]:
    facts = {"format": str(ready.format), "duration_ms": ready.duration_ms}
    return {**facts, "timings": ready.timings.model_dump()}


def _failed_fields(error: CloneError) -> dict[str, object]:
    """The stages that ran (ms each, the failing one last); none if it failed before them."""
    facts = {"error_code": str(error.code), "retryable": error.transient}
    return {**facts, "stage_ms": dict(error.stage_ms)}


def _failed(request: CloneRequest | RequestHeader, error: CloneError) -> CloneFailed:
    return CloneFailed(
        request_id=request.request_id,
        tenant_id=request.tenant_id,
        error_code=error.code,
        message=error.message,
        retryable=error.transient,
        attempts=error.attempts,
        failed_at=datetime.now(UTC),
        metadata=request.metadata,
    )


def _source(record: ConsumerRecord) -> RecordSource:
    return RecordSource(record.topic, record.partition, record.offset)


def _dead_letter(record: ConsumerRecord, error: BaseException) -> DeadLetter:
    return DeadLetter(
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        key=record.key,
        value=record.value,
        headers=list(record.headers),
        error=error,
    )
