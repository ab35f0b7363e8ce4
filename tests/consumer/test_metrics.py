"""The Metrics API: each call moves the series it should, by the amount it should.

Every test gets its own CollectorRegistry, so values are exact and tests share nothing.
"""

import asyncio
import re
from datetime import timedelta

import pytest
from aiokafka import TopicPartition
from prometheus_client import CollectorRegistry, generate_latest

from consumer.backends.base import CloneResult
from consumer.telemetry import (
    LATENCY_BUCKETS,
    STAGES,
    Metrics,
    Stage,
    exported_names,
)
from schemas.events import ErrorCode, ModelName
from tests.schemas.samples import CREATED, full_audio_ready, full_failed, full_request

REQUEST = full_request().model_copy(update={"model": ModelName.QWEN3_TTS_12HZ_1_7B_BASE})


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> Metrics:
    return Metrics(registry)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """A sample's value; 0 for a labelled series that was never touched."""
    found = registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def result(**overrides: object) -> CloneResult:
    fields: dict[str, object] = {
        "audio": b"RIFF",
        "cold_start": False,
        "model_load_seconds": 12.5,
        "container_id": "ta-1",
        "inference_seconds": 2.0,
    }
    return CloneResult(**{**fields, **overrides})  # type: ignore[arg-type]


def test_audio_ready_counts_by_model_and_observes_end_to_end_latency(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    published = CREATED + timedelta(seconds=42)
    for _ in range(3):
        metrics.outcome_published(REQUEST, full_audio_ready(), now=published)

    requests = "voiceclone_requests_total"
    assert value(registry, requests, model="1.7B", outcome="audio_ready") == 3
    assert value(registry, requests, model="1.7B", outcome="failed") == 0
    latency = "voiceclone_end_to_end_latency_seconds"
    labels = {"model": "1.7B", "outcome": "audio_ready"}
    assert value(registry, f"{latency}_count", **labels) == 3
    assert value(registry, f"{latency}_sum", **labels) == pytest.approx(126)
    assert value(registry, f"{latency}_bucket", **labels, le="30.0") == 0
    assert value(registry, f"{latency}_bucket", **labels, le="45.0") == 3


def test_failed_outcome_counts_its_error_code(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    small = REQUEST.model_copy(update={"model": ModelName.QWEN3_TTS_12HZ_0_6B_BASE})
    failed = full_failed().model_copy(update={"error_code": ErrorCode.INFERENCE_TIMEOUT})
    metrics.outcome_published(small, failed, now=CREATED + timedelta(seconds=2))

    assert value(registry, "voiceclone_requests_total", model="0.6B", outcome="failed") == 1
    assert (
        value(registry, "voiceclone_failures_total", model="0.6B", error_code="INFERENCE_TIMEOUT")
        == 1
    )
    assert value(
        registry, "voiceclone_end_to_end_latency_seconds_sum", model="0.6B", outcome="failed"
    ) == pytest.approx(2)


def test_latency_is_never_negative_when_the_producer_clock_runs_ahead(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    metrics.outcome_published(REQUEST, full_audio_ready(), now=CREATED - timedelta(seconds=5))

    labels = {"model": "1.7B", "outcome": "audio_ready"}
    assert value(registry, "voiceclone_end_to_end_latency_seconds_sum", **labels) == 0
    assert value(registry, "voiceclone_end_to_end_latency_seconds_count", **labels) == 1


def test_known_series_start_at_zero(registry: CollectorRegistry) -> None:
    Metrics(registry)

    for model in ("1.7B", "0.6B"):
        for outcome in ("audio_ready", "failed"):
            labels = {"model": model, "outcome": outcome}
            assert registry.get_sample_value("voiceclone_requests_total", labels) == 0
        for code in ErrorCode:
            labels = {"model": model, "error_code": code.value}
            assert registry.get_sample_value("voiceclone_failures_total", labels) == 0
    dead = {"model": "unknown", "outcome": "dead_letter"}
    assert registry.get_sample_value("voiceclone_requests_total", dead) == 0
    for reason in ("corrupt", "unknown_schema", "wrong_type", "handler_error"):
        labels = {"reason": reason}
        assert registry.get_sample_value("voiceclone_dead_letters_total", labels) == 0


def test_dead_letter_counts_request_and_reason(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    metrics.dead_lettered("corrupt")
    metrics.dead_lettered("corrupt")
    metrics.dead_lettered("handler_error", model="1.7B")

    assert value(registry, "voiceclone_dead_letters_total", reason="corrupt") == 2
    assert value(registry, "voiceclone_dead_letters_total", reason="handler_error") == 1
    requests = "voiceclone_requests_total"
    assert value(registry, requests, model="unknown", outcome="dead_letter") == 2
    assert value(registry, requests, model="1.7B", outcome="dead_letter") == 1


def test_stage_is_timed_also_when_it_raises(
    metrics: Metrics, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    ticks = iter([100.0, 103.5])
    monkeypatch.setattr("consumer.telemetry.time.perf_counter", lambda: next(ticks))
    ms: dict[Stage, int] = {"fetch_reference": 20}  # what the request's outcome reports

    with pytest.raises(RuntimeError), metrics.stage("inference", "1.7B", ms):
        raise RuntimeError("backend exploded")

    labels = {"stage": "inference", "model": "1.7B"}
    assert value(registry, "voiceclone_stage_duration_seconds_count", **labels) == 1
    assert value(registry, "voiceclone_stage_duration_seconds_sum", **labels) == 3.5
    assert ms == {"fetch_reference": 20, "inference": 3500}


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_has_its_own_series(
    metrics: Metrics, registry: CollectorRegistry, stage: str
) -> None:
    metrics.observe_stage(stage, "0.6B", 0.02)  # type: ignore[arg-type]

    name = "voiceclone_stage_duration_seconds"
    assert value(registry, f"{name}_bucket", stage=stage, model="0.6B", le="0.025") == 1
    assert value(registry, f"{name}_bucket", stage=stage, model="0.6B", le="0.01") == 0
    others = [s for s in STAGES if s != stage]
    assert all(value(registry, f"{name}_count", stage=s, model="0.6B") == 0 for s in others)


def test_warm_backend_call_records_duration_audio_and_real_time_factor(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    metrics.observe_backend_call("modal", "1.7B", 2.5, result(inference_seconds=2.0), 4.0)

    call = {"backend": "modal", "model": "1.7B", "cold_start": "false"}
    assert value(registry, "voiceclone_backend_call_duration_seconds_count", **call) == 1
    assert value(registry, "voiceclone_backend_call_duration_seconds_sum", **call) == 2.5
    assert value(registry, "voiceclone_audio_generated_seconds_total", model="1.7B") == 4.0
    assert value(registry, "voiceclone_real_time_factor_sum", model="1.7B") == 0.5
    assert value(registry, "voiceclone_real_time_factor_bucket", model="1.7B", le="0.5") == 1
    assert value(registry, "voiceclone_real_time_factor_bucket", model="1.7B", le="0.3") == 0
    # The container had loaded earlier: no cold start, no load time counted again.
    assert value(registry, "voiceclone_cold_starts_total", backend="modal", model="1.7B") == 0
    assert (
        value(registry, "voiceclone_model_load_seconds_count", backend="modal", model="1.7B") == 0
    )


def test_cold_start_counts_and_observes_model_load(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    metrics.observe_backend_call("local", "0.6B", 30.0, result(cold_start=True), 4.0)
    metrics.observe_backend_call("local", "0.6B", 25.0, result(cold_start=True), 4.0)

    labels = {"backend": "local", "model": "0.6B"}
    assert value(registry, "voiceclone_cold_starts_total", **labels) == 2
    assert value(registry, "voiceclone_model_load_seconds_count", **labels) == 2
    assert value(registry, "voiceclone_model_load_seconds_sum", **labels) == 25.0
    cold = {**labels, "cold_start": "true"}
    assert value(registry, "voiceclone_backend_call_duration_seconds_sum", **cold) == 55.0


def test_backend_without_inference_time_uses_the_call_duration_for_rtf(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    metrics.observe_backend_call(
        "http", "1.7B", 6.0, result(cold_start=None, inference_seconds=None), 4.0
    )

    assert value(registry, "voiceclone_real_time_factor_sum", model="1.7B") == 1.5
    unknown = {"backend": "http", "model": "1.7B", "cold_start": "unknown"}
    assert value(registry, "voiceclone_backend_call_duration_seconds_count", **unknown) == 1


def test_failed_backend_call_is_timed_without_audio(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    with pytest.raises(TimeoutError), metrics.backend_call("modal", "1.7B"):
        raise TimeoutError

    unknown = {"backend": "modal", "model": "1.7B", "cold_start": "unknown"}
    assert value(registry, "voiceclone_backend_call_duration_seconds_count", **unknown) == 1
    assert value(registry, "voiceclone_audio_generated_seconds_total", model="1.7B") == 0
    assert value(registry, "voiceclone_real_time_factor_count", model="1.7B") == 0


def test_backend_call_context_uses_the_result_set_inside(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    with metrics.backend_call("modal", "1.7B") as call:
        call.result, call.audio_seconds = result(cold_start=True), 8.0

    assert value(registry, "voiceclone_cold_starts_total", backend="modal", model="1.7B") == 1
    assert value(registry, "voiceclone_audio_generated_seconds_total", model="1.7B") == 8.0


async def test_in_flight_goes_up_and_back_down_also_on_cancellation(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    entered = asyncio.Event()

    async def work() -> None:
        with metrics.in_flight():
            entered.set()
            await asyncio.sleep(3600)

    tasks = [asyncio.create_task(work()) for _ in range(3)]
    await entered.wait()
    await asyncio.sleep(0)
    assert value(registry, "voiceclone_requests_in_flight") == 3
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert value(registry, "voiceclone_requests_in_flight") == 0


def test_lag_per_partition_and_revocation_drops_its_series(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    metrics.rebalanced("assigned", [TopicPartition("req", 0), TopicPartition("req", 1)])
    metrics.set_lag("req", 0, 17)
    metrics.set_lag("req", 1, 3)
    metrics.set_lag("req", 1, -2)  # end offset read before a commit: never below zero

    lag = "voiceclone_consumer_lag_records"
    assert registry.get_sample_value(lag, {"topic": "req", "partition": "0"}) == 17
    assert registry.get_sample_value(lag, {"topic": "req", "partition": "1"}) == 0

    metrics.rebalanced("revoked", [TopicPartition("req", 0), TopicPartition("req", 2)])

    assert registry.get_sample_value(lag, {"topic": "req", "partition": "0"}) is None
    assert registry.get_sample_value(lag, {"topic": "req", "partition": "1"}) == 0
    assert value(registry, "voiceclone_rebalances_total", event="assigned") == 1
    assert value(registry, "voiceclone_rebalances_total", event="revoked") == 1


def test_retries_commit_failures_by_reason(metrics: Metrics, registry: CollectorRegistry) -> None:
    metrics.retried("publish")
    metrics.retried("publish")
    metrics.retried(ErrorCode.STORAGE_FAILED.value)
    metrics.commit_failed()

    assert value(registry, "voiceclone_retries_total", reason="publish") == 2
    assert value(registry, "voiceclone_retries_total", reason="STORAGE_FAILED") == 1
    assert value(registry, "voiceclone_commit_failures_total") == 1


def test_build_info_names_the_version(registry: CollectorRegistry) -> None:
    Metrics(registry)

    (sample,) = [
        s for family in registry.collect() for s in family.samples if s.name.endswith("_info")
    ]
    assert sample.name == "voiceclone_build_info"
    assert sample.value == 1
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", sample.labels["version"])


def test_names_and_labels_follow_prometheus_conventions(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    # Touch every series, so each labelled family shows its labels.
    metrics.outcome_published(REQUEST, full_audio_ready(), now=CREATED)
    metrics.outcome_published(REQUEST, full_failed(), now=CREATED)
    metrics.dead_lettered("corrupt")
    metrics.observe_stage("upload", "1.7B", 1.0)
    metrics.observe_backend_call("modal", "1.7B", 1.0, result(cold_start=True), 4.0)
    metrics.set_lag("req", 0, 1)
    metrics.rebalanced("assigned", [])
    metrics.retried("publish")
    metrics.commit_failed()

    families = list(registry.collect())
    assert all(family.name.startswith("voiceclone_") for family in families)
    names = exported_names(registry)
    counters = [family.name for family in families if family.type == "counter"]
    assert all(f"{name}_total" in names for name in counters)
    labels = {key for family in families for sample in family.samples for key in sample.labels}
    # Small fixed sets only: nothing per request, voice or tenant.
    assert labels == {
        *("model", "outcome", "error_code", "stage", "backend", "cold_start", "reason"),
        *("topic", "partition", "event", "le", "version", "python"),
    }


def test_default_registry_adds_process_metrics() -> None:
    text = generate_latest(Metrics().registry).decode()

    assert "process_resident_memory_bytes" in text
    assert "voiceclone_build_info" in text


def test_latency_buckets_reach_minutes() -> None:
    assert LATENCY_BUCKETS[0] <= 0.5
    assert LATENCY_BUCKETS[-1] >= 900
