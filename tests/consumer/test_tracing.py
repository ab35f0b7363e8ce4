"""Tracing through a running worker (on Kafka in memory: the record headers are what matters):
on, each request gets a span that continues the trace its headers name, a child span per
stage, ids and codes as attributes but never the text, and its outcome's `traceparent` names
that span; off, no span is made and the outcome carries the request's own trace headers."""

from collections.abc import Iterator, Sequence

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from consumer.backends import BackendSettings
from consumer.settings import WorkerSettings
from consumer.telemetry import REQUEST_SPAN
from schemas.events import AudioReady, CloneFailed, CloneRequest, ErrorCode
from tests.fixtures.memory_kafka import MemoryKafka
from tests.fixtures.seed import SeedServer
from tests.fixtures.worker import (
    Outcomes,
    Requests,
    WorkerSettingsFactory,
    clone_request,
    running_worker,
)

pytestmark = pytest.mark.timeout(120)

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
PARENT_ID = 0x00F067AA0BA902B7
INCOMING = [
    ("traceparent", f"00-{TRACE_ID:032x}-{PARENT_ID:016x}-01".encode()),
    ("tracestate", b"vendor=opaque"),
]
TEXT = "a sentence only the request itself may hold"
STAGES = ["fetch_reference", "inference", "encode", "upload", "publish"]

# The global provider can be set once per process: one for this module, emptied per test.
_EXPORTER = InMemorySpanExporter()
_PROVIDER = TracerProvider()
_PROVIDER.add_span_processor(SimpleSpanProcessor(_EXPORTER))


@pytest.fixture
def exported() -> Iterator[InMemorySpanExporter]:
    if trace.get_tracer_provider() is not _PROVIDER:
        trace.set_tracer_provider(_PROVIDER)
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


@pytest.fixture
def http_settings(
    make_memory_settings: WorkerSettingsFactory,
    seed_server: SeedServer,
) -> WorkerSettingsFactory:
    def make(**overrides: object) -> WorkerSettings:
        backend = BackendSettings(kind="http", http={"base_url": seed_server.url})
        return make_memory_settings(backend=backend, **overrides)

    return make


async def run(settings: WorkerSettings, kafka: MemoryKafka, *requests: CloneRequest) -> Outcomes:
    async with (
        Requests(settings, kafka) as sender,
        Outcomes(settings, kafka) as outcomes,
        running_worker(settings, kafka),
    ):
        await sender.send(*requests, headers=INCOMING)
        await outcomes.wait_for([request.request_id for request in requests])
    return outcomes


def request_span(spans: Sequence[ReadableSpan], request_id: str) -> ReadableSpan:
    (span,) = [
        s
        for s in spans
        if s.name == REQUEST_SPAN and s.attributes["voiceclone.request_id"] == request_id
    ]
    return span


def children(spans: Sequence[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    return sorted(
        (s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id),
        key=lambda s: s.start_time or 0,
    )


def traceparent_of(span: ReadableSpan) -> bytes:
    return f"00-{span.context.trace_id:032x}-{span.context.span_id:016x}-01".encode()


async def test_a_traced_request_continues_the_incoming_trace_stage_by_stage(
    http_settings: WorkerSettingsFactory,
    memory_kafka: MemoryKafka,
    voice_uri: str,
    exported: InMemorySpanExporter,
) -> None:
    served = clone_request(voice_uri, text=TEXT)
    unreachable = clone_request(voice_uri.replace("voice.wav", "missing.wav"), text=TEXT)
    outcomes = await run(http_settings(tracing_enabled=True), memory_kafka, served, unreachable)
    spans = exported.get_finished_spans()

    ready = request_span(spans, served.request_id)
    assert ready.context.trace_id == TRACE_ID
    assert ready.parent is not None
    assert ready.parent.span_id == PARENT_ID
    assert ready.parent.is_remote
    assert ready.kind == SpanKind.CONSUMER
    assert ready.context.trace_state.get("vendor") == "opaque"
    assert [s.name for s in children(spans, ready)] == STAGES
    assert ready.attributes is not None
    assert ready.attributes["voiceclone.tenant_id"] == served.tenant_id
    assert ready.attributes["voiceclone.model"] == served.model.size
    assert ready.attributes["voiceclone.outcome"] == "AudioReady"
    assert "voiceclone.error_code" not in ready.attributes
    assert ready.attributes["messaging.kafka.offset"] >= 0
    assert ready.status.status_code == StatusCode.UNSET
    assert isinstance(outcomes.first(served.request_id), AudioReady)
    assert dict(outcomes.headers[served.request_id])["traceparent"] == traceparent_of(ready)
    assert dict(outcomes.headers[served.request_id])["tracestate"] == b"vendor=opaque"

    failed = request_span(spans, unreachable.request_id)
    code = str(ErrorCode.REFERENCE_AUDIO_UNAVAILABLE)
    assert isinstance(outcomes.first(unreachable.request_id), CloneFailed)
    assert failed.attributes is not None
    assert failed.attributes["voiceclone.outcome"] == "CloneFailed"
    assert failed.attributes["voiceclone.error_code"] == code
    assert failed.status.status_code == StatusCode.ERROR
    (fetch, publish) = children(spans, failed)
    assert (fetch.name, publish.name) == ("fetch_reference", "publish")
    assert fetch.attributes is not None
    assert fetch.attributes["voiceclone.error_code"] == code
    assert dict(outcomes.headers[unreachable.request_id])["traceparent"] == traceparent_of(failed)

    for span in spans:  # ids and codes only: neither the text nor a message
        assert span.events == ()
        assert TEXT not in repr(dict(span.attributes or {}))


async def test_untraced_requests_make_no_spans_and_pass_their_trace_headers_on(
    http_settings: WorkerSettingsFactory,
    memory_kafka: MemoryKafka,
    voice_uri: str,
    exported: InMemorySpanExporter,
) -> None:
    request = clone_request(voice_uri)
    outcomes = await run(http_settings(), memory_kafka, request)

    assert isinstance(outcomes.first(request.request_id), AudioReady)
    assert exported.get_finished_spans() == ()
    trace_headers = [(k, v) for k, v in outcomes.headers[request.request_id] if "trace" in k]
    assert trace_headers == INCOMING
