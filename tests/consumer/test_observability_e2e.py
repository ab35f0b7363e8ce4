"""The worker's HTTP port end to end: a real Prometheus scrapes `serve()` while it runs requests
from the real broker through the http backend; PromQL over Prometheus' API sees each request
counted and timed, the alert rules fire on the dead letter, `/readyz` answers 200, and the
requests' W3C trace context comes back on their outcome events."""

import asyncio
import os
from typing import Any

import httpx
import pytest
from schema_registry.client import AsyncSchemaRegistryClient

from consumer.backends import BackendSettings
from consumer.observability.settings import HttpServerSettings
from consumer.settings import WorkerSettings
from schemas import contracts
from schemas.compatibility import Compatibility
from schemas.events import AudioReady, CloneFailed, ErrorCode
from schemas.wire_format import make_codec
from tests.fixtures.prometheus import REPO_ROOT, PrometheusServer, StartPrometheus
from tests.fixtures.registry import OwnRegistry
from tests.fixtures.seed import SeedServer
from tests.fixtures.worker import (
    Outcomes,
    Requests,
    WorkerSettingsFactory,
    clone_request,
    running_worker,
    scrape_worker,
)

pytestmark = pytest.mark.timeout(180)

GOOD = 5
ALERT_RULES = REPO_ROOT / "deploy" / "prometheus" / "alerts.yml"
TRACE = [
    ("traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    ("tracestate", b"vendor=opaque"),
]
# Events report timings in whole milliseconds, the metrics in seconds.
MS = 0.001


@pytest.fixture
def observed_settings(
    make_worker_settings: WorkerSettingsFactory,
    seed_server: SeedServer,
    unused_tcp_port: int,
) -> WorkerSettings:
    """A worker on the http backend whose HTTP port is known in advance (to scrape it)."""
    return make_worker_settings(
        backend=BackendSettings(kind="http", http={"base_url": seed_server.url}),
        http=HttpServerSettings(host="127.0.0.1", port=unused_tcp_port),
    )


def worker_url(settings: WorkerSettings, path: str) -> str:
    return f"http://{settings.http.host}:{settings.http.port}{path}"


def values(result: list[dict[str, Any]]) -> list[float]:
    return [float(row["value"][1]) for row in result]


def by(label: str, result: list[dict[str, Any]]) -> dict[str, float]:
    """A `sum by (label)` result as {label value: value}."""
    return {row["metric"][label]: float(row["value"][1]) for row in result}


async def scalar(prometheus: PrometheusServer, promql: str) -> float:
    (value,) = values(await prometheus.query(promql))
    return value


async def test_prometheus_sees_each_request_the_worker_ran(
    observed_settings: WorkerSettings, voice_uri: str, start_prometheus: StartPrometheus
) -> None:
    settings = observed_settings
    good = [clone_request(voice_uri) for _ in range(GOOD)]
    invalid = clone_request(voice_uri, text="   ")

    async with (
        Requests(settings) as requests,
        Outcomes(settings) as outcomes,
        running_worker(settings),
        httpx.AsyncClient() as http,
    ):
        target = f"{settings.http.host}:{settings.http.port}"
        prometheus = await start_prometheus([target], rule_files=[ALERT_RULES])
        await prometheus.wait_for('up{job="voiceclone-worker"}', lambda r: values(r) == [1.0])
        await requests.send(*good, invalid, headers=TRACE)
        await requests.send_raw(os.urandom(64), key=b"unreadable")
        await outcomes.wait_for([r.request_id for r in (*good, invalid)])
        await outcomes.wait_for_dead_letters(1)

        # Outcomes are counted once acknowledged, so the last scrape may still miss some.
        await prometheus.wait_for(
            "sum by (outcome) (voiceclone_requests_total)",
            lambda r: by("outcome", r) == {"audio_ready": GOOD, "failed": 1, "dead_letter": 1},
        )
        # The lag monitor measures every 10 s: it reaches 0 on each of the three partitions.
        await prometheus.wait_for(
            "voiceclone_consumer_lag_records", lambda r: values(r) == [0.0] * 3, within_seconds=40
        )
        (alert,) = await prometheus.wait_for(
            'ALERTS{alertname="VoicecloneDeadLetters", alertstate="firing"}',
            lambda r: len(r) == 1,
        )
        await assert_request_metrics(prometheus, [outcomes.first(r.request_id) for r in good])
        ready = await http.get(worker_url(settings, "/readyz"))
        alive = await http.get(worker_url(settings, "/healthz"))

    (letter,) = outcomes.dead_letters
    assert alert["metric"]["reason"] == dict(letter.headers)["dlq.error.reason"].decode()
    failed = outcomes.first(invalid.request_id)
    assert isinstance(failed, CloneFailed)
    assert failed.error_code == ErrorCode.INVALID_REQUEST
    assert (ready.status_code, ready.json()["ready"]) == (200, True), ready.text
    assert set(ready.json()["checks"].values()) == {"ok"}
    assert (alive.status_code, alive.text) == (200, "ok\n")
    # The trace context of each request continues on its outcome, audio-ready or clone-failed.
    for request in (*good, invalid):
        assert outcomes.headers[request.request_id][-2:] == TRACE


async def assert_request_metrics(
    prometheus: PrometheusServer, outcomes: list[AudioReady | CloneFailed]
) -> None:
    """What PromQL says after GOOD requests with these `outcomes` (all audio-ready), one
    invalid request (failed before any stage) and one dead letter."""
    events = [event for event in outcomes if isinstance(event, AudioReady)]
    assert len(events) == GOOD, outcomes
    failures = await prometheus.query("sum by (error_code) (voiceclone_failures_total) > 0")
    assert by("error_code", failures) == {"INVALID_REQUEST": 1}
    dead = await prometheus.query("sum by (reason) (voiceclone_dead_letters_total) > 0")
    assert list(by("reason", dead).values()) == [1]
    latency = await prometheus.query(
        "sum by (outcome) (voiceclone_end_to_end_latency_seconds_count)"
    )
    assert by("outcome", latency) == {"audio_ready": GOOD, "failed": 1}
    median = await scalar(
        prometheus,
        "histogram_quantile(0.5, sum by (le) "
        '(voiceclone_end_to_end_latency_seconds_bucket{outcome="audio_ready"}))',
    )
    assert 0 < median < 60
    # From created_at to acknowledged covers at least the pipeline's own time.
    e2e = await scalar(
        prometheus, 'sum(voiceclone_end_to_end_latency_seconds_sum{outcome="audio_ready"})'
    )
    assert e2e >= sum(event.timings.total_ms for event in events) * MS - GOOD * MS

    stages = await prometheus.query("sum by (stage) (voiceclone_stage_duration_seconds_count)")
    assert by("stage", stages) == {
        "fetch_reference": GOOD,
        "inference": GOOD,
        "encode": GOOD,
        "upload": GOOD,
        "publish": GOOD + 1,  # the invalid request's clone-failed event too
    }
    inference = await scalar(
        prometheus, 'sum(voiceclone_stage_duration_seconds_sum{stage="inference"})'
    )
    # The same timings the events report, there rounded to milliseconds.
    assert inference == pytest.approx(
        sum(event.timings.inference_ms for event in events) * MS, abs=GOOD * MS
    )
    calls = await prometheus.query(
        "sum by (backend, cold_start) (voiceclone_backend_call_duration_seconds_count)"
    )
    assert [(row["metric"], float(row["value"][1])) for row in calls] == [
        ({"backend": "http", "cold_start": "unknown"}, GOOD)  # the http contract does not say
    ]
    audio = await scalar(prometheus, "sum(voiceclone_audio_generated_seconds_total)")
    assert audio == pytest.approx(sum(event.duration_ms for event in events) * MS, abs=GOOD * MS)
    assert await scalar(prometheus, "sum(voiceclone_real_time_factor_count)") == GOOD
    assert await scalar(prometheus, "voiceclone_requests_in_flight") == 0
    assert await scalar(prometheus, 'voiceclone_rebalances_total{event="assigned"}') == 1
    assert await scalar(prometheus, "voiceclone_commit_failures_total") == 0
    retries = await prometheus.query("sum by (reason) (voiceclone_retries_total)")
    reasons = ("publish", "schema_registry", "reference", "backend", "storage")
    assert by("reason", retries) == dict.fromkeys(reasons, 0)


async def test_a_registry_outage_is_counted_as_retries_and_readiness_holds(
    observed_settings: WorkerSettings, own_registry: OwnRegistry, voice_uri: str
) -> None:
    settings = observed_settings.model_copy(update={"schema_registry_url": own_registry.url})
    client = AsyncSchemaRegistryClient(own_registry.url)
    await contracts.register(client, contracts.contracts(settings.topics), Compatibility.BACKWARD)
    request = clone_request(voice_uri)
    written = await make_codec(own_registry.url).encode(settings.topics.requests, request)
    retried = {"name": "voiceclone_retries_total", "reason": "schema_registry"}

    async with (
        Requests(settings) as requests,
        Outcomes(settings) as outcomes,
        running_worker(settings),
        httpx.AsyncClient() as http,
    ):
        own_registry.stop()
        try:
            await requests.send_raw(written.value, written.headers, key=b"outage")
            during = await scrape_worker(settings)
            for _ in range(300):  # the worker retries once a second: 2 retries within 30 s
                if during.value(**retried) >= 2:
                    break
                await asyncio.sleep(0.1)
                during = await scrape_worker(settings)
            ready_during = await http.get(worker_url(settings, "/readyz"))
        finally:
            own_registry.start()
        await outcomes.wait_for([request.request_id])
        after = await scrape_worker(settings)

    # Each failed lookup but the last was retried; the request was in flight all along, and
    # the worker stayed ready: the loop goes on and no request is lost.
    assert during.value(**retried) >= 2
    assert during.value("voiceclone_requests_in_flight") == 1
    assert ready_during.status_code == 200, ready_during.text
    assert after.value(**retried) >= during.value(**retried)
    assert after.value("voiceclone_requests_in_flight") == 0
    assert after.value("voiceclone_requests_total", outcome="audio_ready") == 1
    assert isinstance(outcomes.first(request.request_id), AudioReady)
