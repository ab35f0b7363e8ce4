"""The benchmarks run end to end against the real broker, at tiny sizes: every scenario
finishes, nothing fails, and the results have the shape the table and the JSON need.

Nothing here is timed: the numbers of a run this small mean nothing.
"""

import json
from pathlib import Path
from typing import Any

import pytest

from bench import scenarios
from bench.__main__ import SCENARIOS, parse_args
from bench.report import read_json, table, write_json

pytestmark = pytest.mark.timeout(240)

TINY: dict[str, Any] = {
    "relay_overhead": scenarios.OverheadParams(
        messages=30, repetitions=2, warmup_messages=5, max_in_flight=8, partitions=2
    ),
    "concurrency": scenarios.ConcurrencyParams(
        requests=12, latency_seconds=0.2, max_in_flight=4, partitions=2
    ),
    "latency": scenarios.LatencyParams(
        requests=10, warmup_requests=2, rate_per_s=50, max_in_flight=4, partitions=2
    ),
    "memory": scenarios.MemoryParams(in_flight=2, reference_bytes=400_000, partitions=2),
    "soak": scenarios.SoakParams(
        requests=30, checkpoints=(10, 30), window=10, rate_per_s=100, partitions=2
    ),
}


@pytest.fixture
def env(kafka_bootstrap: str, tmp_path: Path) -> scenarios.Env:
    tmpfs = tmp_path / "tmpfs"  # stands in for /dev/shm: the runs only need a second root
    tmpfs.mkdir()
    return scenarios.Env.create(kafka_bootstrap, tmp_path, tmpfs)


async def test_every_benchmark_runs_and_reports(env: scenarios.Env, tmp_path: Path) -> None:
    results = {
        "run": {
            "started_at": "2026-01-01T00:00:00+00:00",
            "quick": True,
            "machine": _machine(),
            "load_average": {"start": [0.5, 0.5, 0.5], "end": [0.6, 0.5, 0.5]},
        },
        "scenarios": {},
    }
    for name, (benchmark, _, _) in SCENARIOS.items():
        results["scenarios"][name] = await benchmark(env, TINY[name])

    _check_overhead(results["scenarios"]["relay_overhead"], TINY["relay_overhead"])
    _check_concurrency(results["scenarios"]["concurrency"], TINY["concurrency"])
    _check_latency(results["scenarios"]["latency"], TINY["latency"])
    _check_memory(results["scenarios"]["memory"], TINY["memory"])
    _check_soak(results["scenarios"]["soak"], TINY["soak"])

    out = tmp_path / "results.json"
    write_json(results, out)
    assert read_json(out) == json.loads(json.dumps(results))
    rows = [line for line in table(results).splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0][2:4] for row in rows[1:]] == ["1.", "2.", "3.", "4.", "5."]


def _check_overhead(result: dict[str, Any], params: scenarios.OverheadParams) -> None:
    assert len(result["runs"]) == params.repetitions
    assert [run["order"][0] for run in result["runs"]] == ["relay", "worker_tmpfs"]
    for kind in ("relay", "worker", "worker_tmpfs"):
        assert result["msgs_per_s"][kind] > 0
    low, high = result["ratio_range"]
    assert 0 < low <= result["ratio"] <= high
    assert result["ratio_tmpfs"] > 0
    assert result["met"] == (result["ratio"] >= params.target_ratio)


def _check_concurrency(result: dict[str, Any], params: scenarios.ConcurrencyParams) -> None:
    assert result["failed"] == 0
    assert result["bound_per_s"] == params.max_in_flight / params.latency_seconds
    # Three whole waves of 0.2 s at the very least: Little's law cannot be beaten.
    assert result["makespan_s"] >= result["best_makespan_s"] == pytest.approx(0.6)
    assert 0 < result["efficiency"] <= result["best_possible_efficiency"] == 1.0
    # The makespan is whole waves plus the two parts of the time lost, and neither is < 0.
    lost = result["start_lag_s"] + result["finish_s"]
    assert result["makespan_s"] == pytest.approx(result["best_makespan_s"] + lost)
    assert result["start_lag_s"] >= 0
    assert result["finish_s"] > -0.002  # outcome timestamps are whole milliseconds
    # The same run storing to tmpfs, for the share of the disk's writes.
    assert result["tmpfs"]["failed"] == 0
    assert 0 < result["tmpfs"]["efficiency"] <= result["best_possible_efficiency"]
    assert result["tmpfs"]["start_lag_s"] >= 0


def _check_latency(result: dict[str, Any], params: scenarios.LatencyParams) -> None:
    for kind in ("worker", "relay", "worker_tmpfs"):
        measured = result[kind]
        assert measured["count"] == params.requests
        assert measured["failed"] == 0
        assert 0 < measured["p50_ms"] <= measured["p99_ms"] <= measured["max_ms"]
    for kind in ("worker", "worker_tmpfs"):
        assert 0 <= result[kind]["pipeline_p50_ms"] <= result[kind]["pipeline_p99_ms"]


def _check_memory(result: dict[str, Any], params: scenarios.MemoryParams) -> None:
    assert result["reference_mb"] == pytest.approx(params.reference_bytes / 1e6, rel=0.01)
    # Each request held in flight holds its own reference, read into memory once.
    assert result["traced_per_in_flight_mb"] >= result["reference_mb"]
    assert result["top_allocations"][0]["mb_per_request"] >= result["reference_mb"]


def test_quick_and_only_select_the_benchmarks() -> None:
    args = parse_args(["--quick", "--only", "latency,memory"])

    assert (args.quick, args.only.split(",")) == (True, ["latency", "memory"])
    with pytest.raises(SystemExit):
        parse_args(["--only", "nonsense"])


def _machine() -> dict[str, Any]:
    return {
        "cpu": "test CPU",
        "cores": 2,
        "memory_gib": 4.0,
        "os": "Linux",
        "python": "3.11",
        "event_loop": "asyncio",
        "packages": {"aiokafka": "0"},
        "broker": "test broker",
    }


def _check_soak(result: dict[str, Any], params: scenarios.SoakParams) -> None:
    assert result["failed"] == 0
    assert [point["requests"] for point in result["points"]] == list(params.checkpoints)
    for point in result["points"]:
        assert point["count"] == params.window
        assert 0 < point["p50_ms"] <= point["p99_ms"]
        assert point["rss_mb"] > 0
        assert point["open_fds"] > 0
        assert point["tasks"] > 0
    assert result["met"] == (result["rss_growth"] < params.target_rss_growth)
