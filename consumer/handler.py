"""One record, start to finish: decode, run the pipeline (cancellable), publish the outcome.

`handle` returns only after an outcome or a dead letter is acknowledged by the broker, and never
raises for a bad message: undecodable input and unexpected failures go to the dead-letter topic
with the original bytes, so nothing is lost and the loop goes on.
"""

import asyncio
from datetime import UTC, datetime

import structlog
from aiokafka import ConsumerRecord

from consumer.cancels import CancelRegistry
from consumer.errors import CloneError
from consumer.pipeline import Pipeline
from producer.publisher import DeadLetter, OutcomePublisher
from schemas.codec import Codec, EventDecodeError
from schemas.events import AudioReady, CloneFailed, CloneRequest, ErrorCode

log = structlog.get_logger(__name__)

_TRACE_HEADERS = frozenset({"traceparent", "tracestate"})


class RecordHandler:
    """Handles one clone-request record at a time; many run concurrently."""

    def __init__(
        self,
        codec: Codec,
        pipeline: Pipeline,
        publisher: OutcomePublisher,
        cancels: CancelRegistry,
    ) -> None:
        self._codec = codec
        self._pipeline = pipeline
        self._publisher = publisher
        self._cancels = cancels

    async def handle(self, record: ConsumerRecord) -> None:
        log_ = log.bind(partition=record.partition, offset=record.offset)
        try:
            request = await self._decode(record)
        except EventDecodeError as exc:
            log_.warning("dead_letter", reason=exc.reason, error=str(exc))
            await self._publisher.dead_letter(_dead_letter(record, exc))
            return
        log_ = log_.bind(request_id=request.request_id)
        try:
            outcome = await self._outcome(request)
        except Exception as exc:
            # A defect, not a property of the request: keep the original for replay.
            log_.exception("handler_failed")
            await self._publisher.dead_letter(_dead_letter(record, exc))
            return
        trace = [(k, v) for k, v in record.headers if k in _TRACE_HEADERS]
        await self._publisher.publish(outcome, trace)
        log_.info("outcome_published", outcome=type(outcome).__name__)

    async def _decode(self, record: ConsumerRecord) -> CloneRequest:
        event = await self._codec.decode(record.topic, record.value, record.headers)
        if not isinstance(event, CloneRequest):
            raise EventDecodeError(
                "wrong_type", f"expected CloneRequest, got {type(event).__name__}"
            )
        return event

    async def _outcome(self, request: CloneRequest) -> AudioReady | CloneFailed:
        try:
            return await self._cancellable(request)
        except CloneError as exc:
            return _failed(request, exc)

    async def _cancellable(self, request: CloneRequest) -> AudioReady:
        """Run the pipeline, racing it against a cancel event for this request."""
        with self._cancels.watch(request.tenant_id, request.request_id) as cancelled:
            work = asyncio.ensure_future(self._pipeline.process(request))
            waiter = asyncio.ensure_future(cancelled.wait())
            try:
                await asyncio.wait({work, waiter}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                # Also on our own cancellation (shutdown): never leave the work running.
                waiter.cancel()
                if not work.done():
                    work.cancel()
                    await asyncio.gather(work, return_exceptions=True)
            if work.cancelled():
                raise CloneError(ErrorCode.CANCELLED, "cancelled by a clone-cancel event")
            return work.result()


def _failed(request: CloneRequest, error: CloneError) -> CloneFailed:
    return CloneFailed(
        request_id=request.request_id,
        tenant_id=request.tenant_id,
        error_code=error.code,
        message=error.message,
        retryable=error.retryable,
        attempts=1,
        failed_at=datetime.now(UTC),
        metadata=request.metadata,
    )


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
