"""What the worker reports per request: Prometheus metrics, and optional OpenTelemetry spans.

Metrics: every metric the worker exports, in one class (`Metrics`), on the registry it is given.
Names share the `voiceclone_` prefix and use base units (`_seconds`); counters end in `_total`.
Labels come from small fixed sets (model size, outcome, stage, backend, cold start, error code,
decode reason, partition), never request, voice or tenant ids. Timings are taken in try/finally
(context managers) and the in-flight gauge goes up and down in one place, so they stay true when
a request fails or is cancelled.

The worker calls: `in_flight()` around each record, `stage()` around each stage of a request
(timed, and spanned when the request is traced), `backend_call()` around the backend's clone,
`outcome_published()` / `dead_lettered()` once the broker acknowledged, `retried()`,
`rebalanced()`, `set_lag()` and `commit_failed()` from the consume loop.

Spans, off by default: one per request (`RequestTracing`), a child per stage. The worker only
asks the global TracerProvider for a tracer: exporting is the deployment's choice
(`opentelemetry-sdk`, an exporter and the standard `OTEL_*` variables, for instance through
`opentelemetry-instrument`); without one installed, the spans are the API's no-ops. A request's
span continues the trace named by its clone-request's `traceparent`/`tracestate` headers, and its
outcome's headers then name the request's span. Spans carry ids and codes, never request text:
exceptions are not recorded on them (a message may quote what a backend said).

Off, no span is started: the incoming trace headers are copied onto the outcome as they are,
and each stage costs one context-variable lookup.
"""

import contextlib
import platform
import time
from collections.abc import Iterable, Iterator, MutableMapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from typing import Any, Final, Literal, TypeVar, get_args

from aiokafka import ConsumerRecord, TopicPartition
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer, TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric

from consumer.backends.base import CloneResult
from producer.retry import BROKER_OUTAGE, SCHEMA_REGISTRY_OUTAGE
from schemas.codec import InHeaders as Headers
from schemas.errors import DecodeReason
from schemas.events import AudioReady, CloneFailed, CloneRequest, RequestHeader
from schemas.vocabulary import ErrorCode, ModelSize, VoicecloneError

PREFIX: Final = "voiceclone"
UNKNOWN_MODEL: Final = "unknown"  # dead letters: the request (and so its model) is unreadable
HANDLER_ERROR: Final = "handler_error"  # dead-letter reason for a defect, not a decode failure
TABLE_BEGIN: Final = "<!-- metrics-table:begin -->"
TABLE_END: Final = "<!-- metrics-table:end -->"

Outcome = Literal["audio_ready", "failed", "dead_letter"]
Stage = Literal["fetch_reference", "inference", "encode", "upload", "publish"]
RebalanceEvent = Literal["assigned", "revoked"]
# Pipeline stages retried after a transient failure (retry reasons beside the publisher's).
RetriedStage = Literal["reference", "backend", "storage"]
STAGES: Final = get_args(Stage)
RETRIED_STAGES: Final = get_args(RetriedStage)

# TTS takes seconds to minutes: a sentence on a warm GPU is ~1 s, a long text or a cold start
# (container start plus model load) reaches minutes.
LATENCY_BUCKETS: Final = (
    *(0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60),
    *(90, 120, 180, 300, 450, 600, 900, 1800),
)
# Stages span milliseconds (encode, publish) to minutes (inference).
STAGE_BUCKETS: Final = (
    *(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    *(20, 30, 60, 120, 300, 600),
)
MODEL_LOAD_BUCKETS: Final = (1, 2.5, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600)
# Inference seconds per second of audio: below 1 is faster than real time.
RTF_BUCKETS: Final = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10)

REQUEST_SPAN = "voiceclone.request"
TRACE_HEADERS = frozenset({"traceparent", "tracestate"})
_PROPAGATOR = TraceContextTextMapPropagator()
# The tracer of the request handled in this context, None when it is not traced. A context
# variable because the stages run in the pipeline's own task, which inherits it: no tracer is
# threaded through the pipeline.
_request_tracer: ContextVar[Tracer | None] = ContextVar("request_tracer", default=None)


_M = TypeVar("_M", bound=MetricWrapperBase)


@dataclass(frozen=True)
class MetricDoc:
    """One metric as the docs' table shows it (docs/operations/metrics.md)."""

    metric: MetricWrapperBase
    labels: tuple[str, ...]

    @property
    def name(self) -> str:
        """The name queries use: counters with `_total`, info metrics with `_info`."""
        family = self._family()
        return family.name + {"counter": "_total", "info": "_info"}.get(family.type, "")

    @property
    def kind(self) -> str:
        return self._family().type

    @property
    def documentation(self) -> str:
        return self._family().documentation

    def _family(self) -> Metric:
        (family,) = self.metric.describe()  # one per metric object
        return family


@dataclass
class BackendCall:
    """Filled in by the caller inside `Metrics.backend_call` once the backend has answered: its
    result, and the seconds of audio in it (read from the audio's bytes)."""

    result: CloneResult | None = None
    audio_seconds: float = 0.0


class Metrics:
    """The worker's metrics. Pass a fresh `CollectorRegistry` per test; production passes none
    and gets one that also carries the standard process and platform collectors."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        if registry is None:
            registry = CollectorRegistry()
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
        self.registry = registry
        self.described: list[MetricDoc] = []
        # Labelled children of the per-request metrics: `.labels()` validates and locks per call.
        self._children: dict[tuple[MetricWrapperBase, tuple[str, ...]], Any] = {}
        self._define_request_metrics()
        self._define_backend_metrics()
        self._define_consumer_metrics()
        build = {"version": _version(), "python": platform.python_version()}
        info = Info(
            f"{PREFIX}_build", "Version of the running worker (value 1).", registry=registry
        )
        info.info(build)
        self.described.append(MetricDoc(info, tuple(build)))  # Info's labels come from .info()

    @classmethod
    def unexported(cls) -> "Metrics":
        """Metrics on a registry of their own that nobody serves: the default of components
        built outside a worker (tests, benchmarks), so callers that do not care pass none."""
        return cls(CollectorRegistry())

    def _add(
        self,
        kind: type[_M],
        name: str,
        documentation: str,
        labels: Sequence[str] = (),
        **options: Any,
    ) -> _M:
        """Register one metric `voiceclone_<name>` and describe it for the docs' table."""
        metric = kind(f"{PREFIX}_{name}", documentation, labels, registry=self.registry, **options)
        self.described.append(MetricDoc(metric, tuple(labels)))
        return metric

    def _define_request_metrics(self) -> None:
        self._requests = self._add(
            Counter,
            "requests_total",
            "Clone requests consumed, by model size and outcome (audio_ready, failed, "
            "dead_letter); counted once the outcome is acknowledged by the broker (exactly_once: "
            "staged for the next transaction).",
            ["model", "outcome"],
        )
        self._failures = self._add(
            Counter,
            "failures_total",
            "Clone-failed outcomes by model size and error code.",
            ["model", "error_code"],
        )
        self._end_to_end = self._add(
            Histogram,
            "end_to_end_latency_seconds",
            "From the request's created_at to its outcome acknowledged by the broker.",
            ["model", "outcome"],
            buckets=LATENCY_BUCKETS,
        )
        self._stages = self._add(
            Histogram,
            "stage_duration_seconds",
            "Time spent in one stage of one request, failed attempts included.",
            ["stage", "model"],
            buckets=STAGE_BUCKETS,
        )
        self._in_flight = self._add(
            Gauge,
            "requests_in_flight",
            "Records being processed by this worker now, those waiting for their tenant's "
            "turn included.",
        )
        self._retries = self._add(
            Counter,
            "retries_total",
            "Retried operations, by reason: `publish` (a broker error while sending an outcome "
            "or a dead letter, or no acknowledgement within the broker timeout), "
            "`schema_registry` (a registry outage while decoding a request or encoding an "
            "outcome), `reference` (fetching a reference), `backend` (a clone call) or "
            "`storage` (looking up or storing audio).",
            ["reason"],
        )
        self._dead_letters = self._add(
            Counter,
            "dead_letters_total",
            f"Requests sent to the dead-letter topic, by reason (a decode reason or "
            f"`{HANDLER_ERROR}`).",
            ["reason"],
        )
        self._start_known_series_at_zero()

    def _start_known_series_at_zero(self) -> None:
        # rate() and increase() ignore a series' first sample: a counter born at 1 would hide the
        # first failure or dead letter from the alerts. Known label sets therefore exist from 0.
        for model in ModelSize:
            for outcome in ("audio_ready", "failed"):
                self._requests.labels(model=model, outcome=outcome)
            for code in ErrorCode:
                self._failures.labels(model=model, error_code=code.value)
        self._requests.labels(model=UNKNOWN_MODEL, outcome="dead_letter")
        for reason in (*DecodeReason, HANDLER_ERROR):
            self._dead_letters.labels(reason=str(reason))
        for reason in (BROKER_OUTAGE, SCHEMA_REGISTRY_OUTAGE, *RETRIED_STAGES):
            self._retries.labels(reason=reason)

    def _define_backend_metrics(self) -> None:
        self._backend_seconds = self._add(
            Histogram,
            "backend_call_duration_seconds",
            "One clone call to the backend, by backend, model size and cold start "
            "(true, false, unknown: the backend does not say or the call failed).",
            ["backend", "model", "cold_start"],
            buckets=LATENCY_BUCKETS,
        )
        self._cold_starts = self._add(
            Counter,
            "cold_starts_total",
            "Backend calls served by a container or engine that had just loaded the model.",
            ["backend", "model"],
        )
        self._model_load = self._add(
            Histogram,
            "model_load_seconds",
            "Model load time reported by the backend on cold starts.",
            ["backend", "model"],
            buckets=MODEL_LOAD_BUCKETS,
        )
        self._capped = self._add(
            Counter,
            "generation_capped_total",
            "Backend results of which the engine cut a chunk at its frame cap: the model never "
            "said its end token (runaway generation), so the audio ends at the cap.",
            ["backend", "model"],
        )
        self._audio_seconds = self._add(
            Counter,
            "audio_generated_seconds_total",
            "Seconds of audio generated by the backend.",
            ["model"],
        )
        self._rtf = self._add(
            Histogram,
            "real_time_factor",
            "Inference seconds per second of audio generated (below 1: faster than real time).",
            ["model"],
            buckets=RTF_BUCKETS,
        )

    def _define_consumer_metrics(self) -> None:
        self._lag = self._add(
            Gauge,
            "consumer_lag_records",
            "Records of an assigned requests partition not finished yet: not fetched (end "
            "offset minus position) plus in flight.",
            ["topic", "partition"],
        )
        self._rebalances = self._add(
            Counter,
            "rebalances_total",
            "Partition assignment changes seen by this worker, by event (assigned, revoked).",
            ["event"],
        )
        self._commit_failures = self._add(
            Counter,
            "commit_failures_total",
            "Offset commits the broker refused, that failed or that it did not answer within "
            "the broker timeout; the work is redelivered.",
        )

    def _child(self, metric: _M, *values: str) -> _M:
        """`metric.labels(*values)`, looked up once. Not for metrics whose series are removed."""
        key = (metric, values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    @contextmanager
    def in_flight(self) -> Iterator[None]:
        """Count one record as in flight for the duration of the block."""
        with self._in_flight.track_inprogress():
            yield

    @contextmanager
    def stage(
        self, stage: Stage, model: str, ms: MutableMapping[Stage, int] | None = None
    ) -> Iterator[None]:
        """Time one stage of a request, also when it raises or is cancelled, in a child span of
        the request's when it is traced; its milliseconds also go into `ms` when given (what
        the request's outcome reports)."""
        begin = time.perf_counter()
        try:
            with _stage_span(stage):
                yield
        finally:
            seconds = time.perf_counter() - begin
            if ms is not None:
                ms[stage] = round(seconds * 1000)
            self.observe_stage(stage, model, seconds)

    def observe_stage(self, stage: Stage, model: str, seconds: float) -> None:
        self._child(self._stages, stage, model).observe(seconds)

    @contextmanager
    def backend_call(self, backend: str, model: str) -> Iterator[BackendCall]:
        """Time one backend call; set `.result` and `.audio_seconds` on the yielded object when
        it returns."""
        call = BackendCall()
        begin = time.perf_counter()
        try:
            yield call
        finally:
            seconds = time.perf_counter() - begin
            self.observe_backend_call(backend, model, seconds, call.result, call.audio_seconds)

    def observe_backend_call(
        self,
        backend: str,
        model: str,
        seconds: float,
        result: CloneResult | None,
        audio_seconds: float,
    ) -> None:
        """A finished backend call; `result` None when it failed, else `audio_seconds` of audio."""
        cold_start = None if result is None else result.cold_start
        self._child(self._backend_seconds, backend, model, _flag(cold_start)).observe(seconds)
        if result is None:
            return
        cold_starts = self._child(self._cold_starts, backend, model)  # exists from the first call
        if result.cold_start:
            cold_starts.inc()
            if result.model_load_seconds is not None:
                self._child(self._model_load, backend, model).observe(result.model_load_seconds)
        capped = self._child(self._capped, backend, model)  # exists from the first call
        if result.capped:
            capped.inc()
        self._child(self._audio_seconds, model).inc(audio_seconds)
        if audio_seconds > 0:
            inference = result.inference_seconds
            busy = inference if inference is not None else seconds
            self._child(self._rtf, model).observe(busy / audio_seconds)

    def outcome_published(
        self,
        request: CloneRequest | RequestHeader,
        outcome: AudioReady | CloneFailed,
        now: datetime | None = None,
    ) -> None:
        """An outcome for `request` was acknowledged by the broker (at `now`, default: now)."""
        model = request.model.size
        kind: Outcome = "audio_ready" if isinstance(outcome, AudioReady) else "failed"
        self._child(self._requests, model, kind).inc()
        if isinstance(outcome, CloneFailed):
            self._child(self._failures, model, outcome.error_code.value).inc()
        elapsed = ((now or datetime.now(UTC)) - request.created_at).total_seconds()
        # A producer's clock ahead of ours must not make a negative latency.
        self._child(self._end_to_end, model, kind).observe(max(0.0, elapsed))

    def dead_lettered(self, reason: str, model: str = UNKNOWN_MODEL) -> None:
        """A record was acknowledged on the dead-letter topic."""
        self._child(self._requests, model, "dead_letter").inc()
        self._child(self._dead_letters, reason).inc()

    def retried(self, reason: str) -> None:
        self._child(self._retries, reason).inc()

    def rebalanced(self, event: RebalanceEvent, partitions: Iterable[TopicPartition]) -> None:
        """Partitions were assigned or revoked; revoked ones stop reporting lag."""
        self._rebalances.labels(event=event).inc()
        if event == "revoked":
            for tp in partitions:
                # Another worker owns it now; a stale value would skew the lag alerts.
                with contextlib.suppress(KeyError):  # no lag reported for it yet
                    self._lag.remove(tp.topic, str(tp.partition))

    def set_lag(self, topic: str, partition: int, lag: int) -> None:
        self._lag.labels(topic=topic, partition=str(partition)).set(max(0, lag))

    def commit_failed(self) -> None:
        self._commit_failures.inc()


def exported_names(registry: CollectorRegistry) -> set[str]:
    """Every sample name the registry can expose, labelled series that are still empty included
    (e.g. `x_total`, `x_bucket`, `x_count`, `x_sum` for a counter and a histogram)."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "info": ("_info",),
        "gauge": ("",),
    }
    names = set()
    for family in registry.collect():
        for suffix in suffixes.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names


def render_table() -> str:
    """The metric table of docs/operations/metrics.md (`python -m consumer.telemetry`); a test keeps
    it in step."""
    lines = [TABLE_BEGIN, "| metric | type | labels | meaning |", "|---|---|---|---|"]
    for doc in Metrics(CollectorRegistry()).described:
        labels = ", ".join(f"`{label}`" for label in doc.labels)
        lines.append(f"| `{doc.name}` | {doc.kind} | {labels} | {doc.documentation} |")
    return "\n".join([*lines, TABLE_END])


def _flag(value: bool | None) -> str:
    return "unknown" if value is None else str(value).lower()


def _version() -> str:
    try:
        return metadata.version("voiceclone-worker")
    except metadata.PackageNotFoundError:
        return "unknown"


# -- spans ----------------------------------------------------------------------------------------


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
def _stage_span(name: str) -> Iterator[None]:
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


if __name__ == "__main__":
    print(render_table())
