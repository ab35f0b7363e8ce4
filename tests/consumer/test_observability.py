"""The worker's HTTP port: readiness from Health, /metrics, /healthz, /readyz over real HTTP, and
a real Prometheus scraping it."""

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from datetime import timedelta

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from consumer.observability.health import Health, LoopFacts
from consumer.observability.lag import LagMonitor
from consumer.observability.server import ObservabilityServer
from consumer.observability.settings import HttpServerSettings
from consumer.telemetry import Metrics
from tests.fixtures.kafka import TopicFactory
from tests.fixtures.prometheus import StartPrometheus
from tests.schemas.samples import CREATED, full_audio_ready, full_failed, full_request

PARTITIONS = [TopicPartition("voice.clone.requests", 0), TopicPartition("voice.clone.requests", 1)]
REQUEST = full_request()  # model 0.6B


class FakeClock:
    """Monotonic seconds under the test's control."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def ready_health(clock: FakeClock | None = None) -> Health:
    """Every readiness fact in place; tests take one away."""
    clock = clock or FakeClock()
    health = Health(progress_timeout_seconds=60, backend_timeout_seconds=0.5, clock=clock)
    health.loop_facts = LoopFacts(assigned=set(PARTITIONS), last_poll=clock.now)
    health.producer_connected = connected
    return health


def connected() -> bool:
    return True


def not_connected() -> bool:
    return False


async def reachable() -> bool:
    return True


async def unreachable() -> bool:
    return False


async def hanging() -> bool:
    await asyncio.sleep(3600)
    return True


async def test_ready_when_every_fact_holds() -> None:
    health = ready_health()
    health.backend_ready = reachable

    readiness = await health.check()

    assert readiness.ready
    assert readiness.checks == {
        "partitions": "ok",
        "progress": "ok",
        "kafka": "ok",
        "backend": "ok",
    }


async def test_a_fresh_worker_is_not_ready() -> None:
    readiness = await Health(60, 1).check()

    assert not readiness.ready
    assert readiness.checks["partitions"] == "no partitions assigned"
    assert readiness.checks["progress"] == "the consume loop has not polled yet"
    assert readiness.checks["kafka"] == "producer not connected"


async def test_kafka_is_unready_while_outcomes_or_commits_fail_and_ready_once_they_pass() -> None:
    health = ready_health()

    health.producer_connected = not_connected
    health.loop_facts.commit_failure = "KafkaTimeoutError('offset commit not answered within 10 s')"
    both = await health.check()
    health.producer_connected = connected
    commits = await health.check()
    health.loop_facts.commit_failure = None
    recovered = await health.check()

    assert both.checks["kafka"] == (
        "producer not connected; offset commit failed: "
        "KafkaTimeoutError('offset commit not answered within 10 s')"
    )
    assert not commits.ready
    assert commits.checks["kafka"].startswith("offset commit failed: ")
    assert recovered.ready


async def test_revoking_every_partition_makes_it_unready() -> None:
    health = ready_health()
    health.loop_facts.assigned -= set(PARTITIONS[:1])
    assert (await health.check()).ready

    health.loop_facts.assigned -= set(PARTITIONS[1:])

    readiness = await health.check()
    assert not readiness.ready
    assert readiness.checks["partitions"] == "no partitions assigned"


async def test_a_stalled_loop_is_unready_until_it_polls_again() -> None:
    clock = FakeClock()
    health = ready_health(clock)

    clock.now += 61
    stalled = await health.check()
    health.loop_facts.last_poll = clock.now
    recovered = await health.check()

    assert stalled.checks["progress"] == "the consume loop last polled 61 s ago"
    assert not stalled.ready
    assert recovered.ready


async def test_unreachable_backend_makes_it_unready() -> None:
    health = ready_health()
    health.backend_ready = unreachable

    readiness = await health.check()

    assert not readiness.ready
    assert readiness.checks["backend"] == "backend not reachable"


async def test_a_hanging_backend_check_is_cut_short() -> None:
    health = ready_health()
    health.backend_ready = hanging

    async with asyncio.timeout(5):
        readiness = await health.check()

    assert readiness.checks["backend"] == "backend check took over 0.5 s"


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


@pytest.fixture
async def served(metrics: Metrics) -> AsyncIterator[tuple[ObservabilityServer, Health]]:
    health = Health(progress_timeout_seconds=60, backend_timeout_seconds=1)
    server = ObservabilityServer(HttpServerSettings(host="127.0.0.1", port=0), metrics, health)
    await server.start()
    try:
        yield server, health
    finally:
        await server.stop()


def url(server: ObservabilityServer, path: str) -> str:
    return f"http://127.0.0.1:{server.port}{path}"


async def test_metrics_endpoint_serves_current_values(
    served: tuple[ObservabilityServer, Health], metrics: Metrics
) -> None:
    server, _ = served
    metrics.outcome_published(REQUEST, full_audio_ready(), now=CREATED + timedelta(seconds=9))
    metrics.outcome_published(REQUEST, full_audio_ready(), now=CREATED + timedelta(seconds=9))
    metrics.set_lag("voice.clone.requests", 1, 42)

    async with httpx.AsyncClient() as http:
        response = await http.get(url(server, "/metrics"))

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }
    assert (
        samples[("voiceclone_requests_total", (("model", "0.6B"), ("outcome", "audio_ready")))] == 2
    )
    latency = (("model", "0.6B"), ("outcome", "audio_ready"))
    assert samples[("voiceclone_end_to_end_latency_seconds_sum", latency)] == 18
    lag = (("partition", "1"), ("topic", "voice.clone.requests"))
    assert samples[("voiceclone_consumer_lag_records", lag)] == 42


async def test_metrics_endpoint_speaks_openmetrics_when_asked(
    served: tuple[ObservabilityServer, Health],
) -> None:
    server, _ = served

    async with httpx.AsyncClient() as http:
        response = await http.get(
            url(server, "/metrics"), headers={"Accept": "application/openmetrics-text"}
        )

    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")


async def test_healthz_answers_while_the_loop_runs(
    served: tuple[ObservabilityServer, Health],
) -> None:
    server, _ = served

    async with httpx.AsyncClient() as http:
        response = await http.get(url(server, "/healthz"))

    assert response.status_code == 200
    assert response.text == "ok\n"


async def test_readyz_follows_health(served: tuple[ObservabilityServer, Health]) -> None:
    server, health = served

    async with httpx.AsyncClient() as http:
        before = await http.get(url(server, "/readyz"))
        health.loop_facts.assigned.update(PARTITIONS)
        health.loop_facts.last_poll = time.monotonic()
        health.producer_connected = connected
        health.backend_ready = unreachable
        backend_down = await http.get(url(server, "/readyz"))
        health.backend_ready = reachable
        after = await http.get(url(server, "/readyz"))

    assert before.status_code == 503
    assert before.json()["ready"] is False
    assert before.json()["checks"]["partitions"] == "no partitions assigned"
    assert backend_down.status_code == 503
    assert backend_down.json()["checks"] == {
        "partitions": "ok",
        "progress": "ok",
        "kafka": "ok",
        "backend": "backend not reachable",
    }
    assert after.status_code == 200
    assert after.json() == {"ready": True, "checks": dict.fromkeys(after.json()["checks"], "ok")}


async def test_a_taken_port_fails_at_start(metrics: Metrics) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = ObservabilityServer(
            HttpServerSettings(host="127.0.0.1", port=port), metrics, Health(60, 1)
        )
        with pytest.raises(OSError, match="address already in use") as raised:
            await server.start()
        assert "VOICECLONE_HTTP__PORT" in str(raised.value)  # what to change


async def test_stop_is_safe_twice_and_closes_the_port(metrics: Metrics) -> None:
    server = ObservabilityServer(
        HttpServerSettings(host="127.0.0.1", port=0), metrics, Health(60, 1)
    )
    await server.start()
    address = url(server, "/healthz")

    await server.stop()
    await server.stop()

    async with httpx.AsyncClient() as http:
        with pytest.raises(httpx.ConnectError):
            await http.get(address)
    with pytest.raises(RuntimeError, match="not started"):
        _ = server.port


async def test_prometheus_scrapes_the_worker_and_answers_promql(
    served: tuple[ObservabilityServer, Health],
    metrics: Metrics,
    start_prometheus: StartPrometheus,
) -> None:
    server, _ = served
    prometheus = await start_prometheus([f"127.0.0.1:{server.port}"])
    await prometheus.wait_for('up{job="voiceclone-worker"}', lambda r: _values(r) == [1.0])

    for seconds in (3, 5, 40):
        metrics.outcome_published(
            REQUEST, full_audio_ready(), now=CREATED + timedelta(seconds=seconds)
        )
    metrics.outcome_published(REQUEST, full_failed(), now=CREATED + timedelta(seconds=1))
    metrics.observe_stage("inference", "0.6B", 2.0)

    await prometheus.wait_for(
        'sum(voiceclone_requests_total{model="0.6B"})', lambda r: _values(r) == [4.0]
    )
    by_outcome = await prometheus.query(
        'sum by (outcome) (voiceclone_requests_total{model="0.6B"})'
    )
    assert {row["metric"]["outcome"]: float(row["value"][1]) for row in by_outcome} == {
        "audio_ready": 3.0,
        "failed": 1.0,
    }
    # Two of three audio-ready latencies fall in the first buckets up to 5 s, one at 40 s.
    count = await prometheus.query(
        "voiceclone_end_to_end_latency_seconds_bucket"
        '{model="0.6B", outcome="audio_ready", le="5.0"}'
    )
    assert _values(count) == [2.0]
    median = await prometheus.query(
        "histogram_quantile(0.5, sum by (le) "
        '(voiceclone_end_to_end_latency_seconds_bucket{model="0.6B", outcome="audio_ready"}))'
    )
    assert 3.0 <= _values(median)[0] <= 5.0
    stage = await prometheus.query(
        'voiceclone_stage_duration_seconds_sum{stage="inference", model="0.6B"}'
    )
    assert _values(stage) == [2.0]


def _values(result: list[dict[str, object]]) -> list[float]:
    return [float(row["value"][1]) for row in result]  # type: ignore[index]


async def produce(bootstrap: str, tp: TopicPartition, count: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for index in range(count):
            await producer.send_and_wait(tp.topic, b"x%d" % index, partition=tp.partition)
    finally:
        await producer.stop()


async def fetch_all(consumer: AIOKafkaConsumer, tp: TopicPartition, count: int) -> None:
    fetched = 0
    async with asyncio.timeout(15):
        while fetched < count:
            batch = await consumer.getmany(tp, timeout_ms=500)
            fetched += len(batch.get(tp, []))


async def test_lag_counts_unfetched_and_in_flight_records_also_while_paused(
    kafka_bootstrap: str, topic_factory: TopicFactory, metrics: Metrics
) -> None:
    topic = await topic_factory("lag", partitions=2)
    first, second = TopicPartition(topic, 0), TopicPartition(topic, 1)
    await produce(kafka_bootstrap, first, 5)
    await produce(kafka_bootstrap, second, 2)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka_bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    await consumer.start()
    in_flight = {first: 0, second: 0}
    monitor = LagMonitor(metrics)

    def lag() -> dict[int, float | None]:
        return {
            tp.partition: metrics.registry.get_sample_value(
                "voiceclone_consumer_lag_records", {"topic": topic, "partition": str(tp.partition)}
            )
            for tp in (first, second)
        }

    try:
        consumer.assign([first, second])
        await monitor.update(consumer, in_flight.__getitem__)
        assert lag() == {0: 5, 1: 2}

        consumer.pause(second)
        await fetch_all(consumer, first, 5)
        in_flight[first] = 2  # three of the five finished
        await produce(kafka_bootstrap, second, 3)  # arrives while the partition is paused
        await monitor.update(consumer, in_flight.__getitem__)
        assert lag() == {0: 2, 1: 5}

        metrics.rebalanced("revoked", [second])
        consumer.assign([first])
        consumer.seek(first, 5)  # assign() forgets positions; the worker's stays where it was
        await monitor.update(consumer, in_flight.__getitem__)
        assert lag() == {0: 2, 1: None}
    finally:
        await consumer.stop()
