"""Optional OpenTelemetry spans: one per request, a child per stage. Off by default.

The worker only asks the global TracerProvider for a tracer: exporting is the deployment's
choice (`opentelemetry-sdk`, an exporter and the standard `OTEL_*` variables, for instance through
`opentelemetry-instrument`); without one installed, the spans are the API's no-ops. A request's
span continues the trace named by its clone-request's `traceparent`/`tracestate` headers, and its
outcome's headers then name the request's span. Spans carry ids and codes, never request text:
exceptions are not recorded on them (a message may quote what a backend said).

Off, no span is started: the incoming trace headers are copied onto the outcome as they are,
and each stage costs one context-variable lookup.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from aiokafka import ConsumerRecord
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer, TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from schemas.codec import InHeaders as Headers
from schemas.events import AudioReady, CloneFailed
from schemas.vocabulary import VoicecloneError

REQUEST_SPAN = "voiceclone.request"
TRACE_HEADERS = frozenset({"traceparent", "tracestate"})
_PROPAGATOR = TraceContextTextMapPropagator()
# The tracer of the request handled in this context, None when it is not traced. A context
# variable because the stages run in the pipeline's own task, which inherits it: no tracer is
# threaded through the pipeline.
_request_tracer: ContextVar[Tracer | None] = ContextVar("request_tracer", default=None)


class RequestTracing:
    """Starts the span of each request; `provider` defaults to the global one."""

    def __init__(self, provider: TracerProvider | None = None) -> None:
        self._tracer = trace.get_tracer("voiceclone.worker", tracer_provider=provider)

    @contextmanager
    def request(
        self, record: ConsumerRecord, request_id: str, tenant_id: str, model: str
    ) -> Iterator[Span]:
        """The request's span, current inside: a child of the trace its headers name (a new
        trace when they name none, or a malformed one)."""
        attributes = {
            "voiceclone.request_id": request_id,
            "voiceclone.tenant_id": tenant_id,
            "voiceclone.model": model,
            "messaging.destination.name": record.topic,
            "messaging.destination.partition.id": str(record.partition),
            "messaging.kafka.offset": record.offset,
        }
        with self._tracer.start_as_current_span(
            REQUEST_SPAN,
            context=_PROPAGATOR.extract(_carrier(record.headers)),
            kind=SpanKind.CONSUMER,
            attributes=attributes,
            record_exception=False,
        ) as span:
            token = _request_tracer.set(self._tracer)
            try:
                yield span
            finally:
                _request_tracer.reset(token)


@contextmanager
def stage_span(name: str) -> Iterator[None]:
    """A child span of the current request's span named `name`; nothing when not traced."""
    tracer = _request_tracer.get()
    if tracer is None:
        yield
        return
    with tracer.start_as_current_span(
        name, record_exception=False, set_status_on_exception=False
    ) as span:
        try:
            yield
        except Exception as exc:
            code = str(exc.code) if isinstance(exc, VoicecloneError) else type(exc).__name__
            _failed(span, code)
            raise


def outcome_headers(incoming: Headers) -> list[tuple[str, bytes | None]]:
    """The trace headers of a request's outcome: the current span's context when the request
    is traced, else the incoming trace headers as they are."""
    if _request_tracer.get() is None:
        return [(key, value) for key, value in incoming if key in TRACE_HEADERS]
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return [(key, value.encode()) for key, value in carrier.items()]


def mark_outcome(span: Span, outcome: AudioReady | CloneFailed | None, code: str = "") -> None:
    """Say on the request's span what came of it: an event, or (None) a dead letter (`code`)."""
    if not span.is_recording():
        return
    span.set_attribute(
        "voiceclone.outcome", "dead_letter" if outcome is None else type(outcome).__name__
    )
    if isinstance(outcome, CloneFailed):
        code = str(outcome.error_code)
    if code:
        _failed(span, code)


def _failed(span: Span, code: str) -> None:
    span.set_attribute("voiceclone.error_code", code)
    span.set_status(Status(StatusCode.ERROR, code))


def _carrier(headers: Headers) -> dict[str, str]:
    # latin-1 decodes any bytes: a malformed value is refused by the propagator, not by us.
    return {
        key: value.decode("latin-1")
        for key, value in headers
        if key in TRACE_HEADERS and value is not None
    }
