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
"""

import asyncio
import functools
import re
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager, nullcontext
from datetime import UTC, datetime

import structlog
from aiokafka import ConsumerRecord
from opentelemetry.trace import INVALID_SPAN, Span
from pydantic import ValidationError

from consumer.admission import UNLIMITED, TenantAdmission
from consumer.cancels import Cancelled, CancelRegistry
from consumer.errors import CloneError
from consumer.pipeline import Pipeline
from consumer.telemetry import HANDLER_ERROR, Metrics, RequestTracing, mark_outcome, outcome_headers
from producer.publisher import DeadLetter, OutcomeSink, RecordSource
from producer.retry import SCHEMA_REGISTRY_OUTAGE, codec_outage, retry_while
from schemas.codec import Codec, EventDecodeError
from schemas.events import SAFE_ID_PATTERN, AudioReady, CloneFailed, CloneRequest, RequestHeader

log = structlog.get_logger(__name__)


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
    ) -> AbstractContextManager[Span]:
        """The request's span while it is handled; the API's invalid span when not traced."""
        if self._tracing is None:
            return nullcontext(INVALID_SPAN)
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
