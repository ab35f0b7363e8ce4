"""The five benchmarks. Each takes its parameters and returns a JSON-ready dict of results.

Every run gets fresh topics and a fresh consumer group, and the worker is `serve()` itself
(bench/harness.py) with a fixture backend (bench/backends.py).
"""

import asyncio
import contextlib
import gc
import math
import sysconfig
import time
import tracemalloc
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer

from bench.backends import FixedLatencyBackend, HoldingBackend
from bench.harness import running_worker, worker_settings
from bench.kafka import (
    ArrivalClock,
    Message,
    TopicReader,
    fresh_topics,
    preload,
    request_producer,
    while_running,
)
from bench.measure import median, open_fds, percentile, rss_bytes
from bench.relay import running_relay
from bench.workload import (
    Reference,
    clone_request,
    encode_request,
    request_messages,
    write_reference,
)
from consumer.backends import Backend
from schemas.codec import Codec
from schemas.events import AudioReady
from schemas.topics import Topics
from schemas.wire_format import make_codec

_MB = 1_000_000
_SMALL_REFERENCE_BYTES = 100_000
_DONE_MARGIN_S = 60.0  # beyond the expected duration, before a run is declared stuck
RELAY, WORKER, WORKER_TMPFS = "relay", "worker", "worker_tmpfs"
_REPO = f"{Path(__file__).resolve().parents[1]}/"
_STDLIB = f"{sysconfig.get_paths()['stdlib']}/"


@dataclass(frozen=True)
class Env:
    """What every scenario shares: the broker, scratch directories and the codec.

    `tmpfs`, when the machine has one, is a directory in memory: storage there skips the
    disk's fsync, which separates the worker's own cost from the durable writes'.
    """

    bootstrap: str
    workdir: Path
    codec: Codec
    tmpfs: Path | None = None

    @classmethod
    def create(cls, bootstrap: str, workdir: Path, tmpfs: Path | None = None) -> "Env":
        return cls(bootstrap, workdir, make_codec(None), tmpfs)

    def small_reference(self) -> Reference:
        return write_reference(self.workdir, _SMALL_REFERENCE_BYTES)

    def storage_root(self, kind: str) -> Path:
        if kind == WORKER_TMPFS and self.tmpfs is not None:
            return self.tmpfs / "audio"
        return self.workdir / "audio"


# -- 1. relay overhead ----------------------------------------------------------------------


@dataclass(frozen=True)
class OverheadParams:
    messages: int = 3000
    repetitions: int = 5
    max_in_flight: int = 64
    partitions: int = 8
    warmup_messages: int = 200
    target_ratio: float = 0.7


async def relay_overhead(env: Env, params: OverheadParams) -> dict[str, Any]:
    """Raw relay and worker (and the worker storing to tmpfs, where there is one): same
    broker, same N, one after the other in alternating order, run after run."""
    reference = env.small_reference()
    kinds = [RELAY, WORKER, *([WORKER_TMPFS] if env.tmpfs is not None else [])]
    warmup = OverheadParams(**(asdict(params) | {"messages": params.warmup_messages}))
    for kind in kinds:  # imports, first connections, caches: not measured
        await throughput(env, kind, warmup, reference)
    runs = []
    for repetition in range(params.repetitions):
        order = kinds if repetition % 2 == 0 else kinds[::-1]
        run = {kind: await throughput(env, kind, params, reference) for kind in order}
        ratios = {k: run[k]["msgs_per_s"] / run[RELAY]["msgs_per_s"] for k in kinds[1:]}
        runs.append({"order": order, **run, "ratios": ratios})
    summary = {kind: median([run[kind]["msgs_per_s"] for run in runs]) for kind in kinds}
    ratios = {kind: [run["ratios"][kind] for run in runs] for kind in kinds[1:]}
    ratio = median(ratios[WORKER])
    return {
        "params": asdict(params),
        "msgs_per_s": summary,
        "ratio": ratio,
        "ratio_range": [min(ratios[WORKER]), max(ratios[WORKER])],
        "ratio_tmpfs": median(ratios[WORKER_TMPFS]) if WORKER_TMPFS in ratios else None,
        "met": ratio >= params.target_ratio,
        "runs": runs,
    }


async def throughput(
    env: Env, kind: str, params: OverheadParams, reference: Reference
) -> dict[str, float]:
    """N requests loaded first, then the relay or worker started on them; the rate is taken
    between the first and the last record it produced (their CreateTime), so starting and
    joining the group are left out alike for both."""
    async with fresh_topics(env.bootstrap, params.partitions) as topics:
        messages = await request_messages(env.codec, topics.requests, [reference], params.messages)
        await preload(env.bootstrap, topics.requests, messages)
        async with TopicReader(env.bootstrap) as reader:
            cpu_start = time.process_time()
            async with _runner(env, kind, topics, params.max_in_flight) as runner:
                done = reader.wait_for(topics.audio_ready, params.messages, _DONE_MARGIN_S)
                await while_running(done, runner)
            cpu = time.process_time() - cpu_start
            stamps = sorted((await reader.timestamps(topics.audio_ready)).values())
    span = max(stamps[-1] - stamps[0], 1e-3)
    return {
        "msgs_per_s": (len(stamps) - 1) / span,
        "seconds": span,
        "cpu_ms_per_msg": cpu * 1000 / params.messages,
    }


@contextlib.asynccontextmanager
async def _runner(
    env: Env, kind: str, topics: Topics, max_in_flight: int, backend: Backend | None = None
) -> AsyncIterator[asyncio.Task[None]]:
    """The relay, or the worker with `backend` (default: the instant one); `kind` says where
    the worker stores (on disk or in tmpfs)."""
    if kind == RELAY:
        async with running_relay(env.bootstrap, topics, max_in_flight) as task:
            yield task
        return
    settings = worker_settings(
        env.bootstrap, topics, env.workdir, max_in_flight, storage_root=env.storage_root(kind)
    )
    async with running_worker(settings, backend or FixedLatencyBackend()) as task:
        yield task


# -- 2. concurrency efficiency -----------------------------------------------------------------


@dataclass(frozen=True)
class ConcurrencyParams:
    requests: int = 1000
    latency_seconds: float = 1.0
    max_in_flight: int = 64
    partitions: int = 8
    target_efficiency: float = 0.95


_TMPFS_FIGURES = ("throughput_per_s", "efficiency", "start_lag_s", "start_lag_per_wave_ms")


async def concurrency(env: Env, params: ConcurrencyParams) -> dict[str, Any]:
    """Requests loaded first; throughput from the first backend call to the last outcome,
    against Little's law: at most max_in_flight / latency requests per second.

    Run storing on disk (the result), then, where there is one, on tmpfs (`tmpfs`): the
    difference is what the disk's durable writes cost the waves."""
    result = await _concurrency_run(env, params, WORKER)
    if env.tmpfs is not None:
        in_memory = await _concurrency_run(env, params, WORKER_TMPFS)
        result["tmpfs"] = {key: in_memory[key] for key in (*_TMPFS_FIGURES, "failed")}
    return result


async def _concurrency_run(env: Env, params: ConcurrencyParams, kind: str) -> dict[str, Any]:
    reference = env.small_reference()
    backend = FixedLatencyBackend(params.latency_seconds)
    async with fresh_topics(env.bootstrap, params.partitions) as topics:
        messages = await request_messages(env.codec, topics.requests, [reference], params.requests)
        await preload(env.bootstrap, topics.requests, messages)
        expected_s = params.requests / params.max_in_flight * params.latency_seconds
        async with TopicReader(env.bootstrap) as reader:
            async with _runner(env, kind, topics, params.max_in_flight, backend) as runner:
                done = reader.wait_for(
                    topics.audio_ready, params.requests, expected_s + _DONE_MARGIN_S
                )
                await while_running(done, runner)
            last_outcome = max((await reader.timestamps(topics.audio_ready)).values())
            failed = await reader.count(topics.failed)
    elapsed = last_outcome - backend.call_starts[0]
    bound = params.max_in_flight / params.latency_seconds
    rate = params.requests / elapsed
    # Whole waves of max_in_flight calls: the best makespan is ceil(N / max) latencies.
    waves = math.ceil(params.requests / params.max_in_flight)
    return {
        "params": asdict(params),
        "throughput_per_s": rate,
        "bound_per_s": bound,
        "efficiency": rate / bound,
        "best_possible_efficiency": params.requests / (waves * params.max_in_flight),
        "makespan_s": elapsed,
        "best_makespan_s": waves * params.latency_seconds,
        **_lost_time(backend.call_starts, last_outcome, params),
        "failed": failed,
        "met": rate / bound >= params.target_efficiency,
    }


def _lost_time(
    starts: list[float], last_outcome: float, params: ConcurrencyParams
) -> dict[str, float]:
    """Where the makespan beyond whole waves of `latency` went; the two parts add up to it.

    `start_lag_s`: how much later than (waves - 1) latencies after the first call the last
    one began: each freed slot waits for its request to be stored and published, and for the
    loop to start the next, and that adds up along a slot's chain of calls.
    `finish_s`: from the end of the last call to its outcome.
    """
    waves = math.ceil(params.requests / params.max_in_flight)
    first, last = min(starts), max(starts)
    lag = last - first - (waves - 1) * params.latency_seconds
    return {
        "start_lag_s": lag,
        "start_lag_per_wave_ms": lag / max(waves - 1, 1) * 1000,
        "finish_s": last_outcome - last - params.latency_seconds,
    }


# -- 3. added latency -----------------------------------------------------------------------


@dataclass(frozen=True)
class LatencyParams:
    rate_per_s: float = 100.0
    requests: int = 1500
    warmup_requests: int = 50
    max_in_flight: int = 16  # the worker's default
    partitions: int = 8
    target_p99_ms: float = 10.0


async def added_latency(env: Env, params: LatencyParams) -> dict[str, Any]:
    """Requests sent at a steady rate; each one's latency is from just before it was produced
    to its outcome arriving at a subscriber. The raw relay run the same way gives the floor
    that two Kafka hops set on this machine; the worker storing to tmpfs (where there is one,
    `worker_tmpfs`), what is left without the disk's durable writes."""
    reference = env.small_reference()
    kinds = [RELAY, WORKER, *([WORKER_TMPFS] if env.tmpfs is not None else [])]
    results = {kind: await _paced(env, kind, params, reference) for kind in kinds}
    worker = results[WORKER]
    return {
        "params": asdict(params),
        **results,
        "met": worker["p99_ms"] <= params.target_p99_ms,
    }


async def _paced(
    env: Env, kind: str, params: LatencyParams, reference: Reference
) -> dict[str, float]:
    async with fresh_topics(env.bootstrap, params.partitions) as topics:
        total = params.warmup_requests + params.requests
        messages = await request_messages(env.codec, topics.requests, [reference], total)
        warmup, measured = messages[: params.warmup_requests], messages[params.warmup_requests :]
        producer = request_producer(env.bootstrap)
        await producer.start()
        clock = ArrivalClock(env.bootstrap, [topics.audio_ready, topics.failed])
        try:
            async with clock, _runner(env, kind, topics, params.max_in_flight) as runner:
                # Also waits out the group join, so the measured requests meet a ready worker.
                await _send_and_wait(producer, topics.requests, warmup, clock, runner, 0)
                sent = await _send_and_wait(
                    producer, topics.requests, measured, clock, runner, params.rate_per_s
                )
        finally:
            await producer.stop()
        outcomes = await _outcomes(env, topics, set(sent), timings=kind != RELAY)
    latencies = [(clock.arrived[key] - at) * 1000 for key, at in sent.items()]
    return _summary(latencies) | outcomes


async def _send_and_wait(
    producer: AIOKafkaProducer,
    topic: str,
    messages: Sequence[Message],
    clock: ArrivalClock,
    runner: asyncio.Task[None],
    rate_per_s: float,
) -> dict[bytes, float]:
    """Send at `rate_per_s` (0: at once), then wait for every outcome; returns send times."""
    sent: dict[bytes, float] = {}
    acks = []
    start = time.perf_counter()
    for index, message in enumerate(messages):
        if rate_per_s:
            await asyncio.sleep(max(0.0, start + index / rate_per_s - time.perf_counter()))
        sent[message.key] = time.perf_counter()
        acks.append(
            await producer.send(topic, message.value, key=message.key, headers=message.headers)
        )
    await while_running(asyncio.gather(*acks), runner)
    await while_running(clock.wait_for(set(sent), _DONE_MARGIN_S), runner)
    return sent


async def _outcomes(env: Env, topics: Topics, keys: set[bytes], timings: bool) -> dict[str, Any]:
    """How many failed; with `timings`, how long the worker's pipeline took per request, from
    its audio-ready events (`timings.total_ms` less `queue_ms`: validate to stored, so neither
    decoding nor publishing nor the Kafka hops)."""
    async with TopicReader(env.bootstrap) as reader:
        found: dict[str, Any] = {"failed": await reader.count(topics.failed)}
        records = await reader.records(topics.audio_ready) if timings else []
    pipeline_ms = []
    for record in records:
        if record.key in keys:
            event = await env.codec.decode(record.topic, record.value, record.headers)
            assert isinstance(event, AudioReady)
            pipeline_ms.append(float(event.timings.total_ms - event.timings.queue_ms))
    if pipeline_ms:
        found["pipeline_p50_ms"] = percentile(pipeline_ms, 50)
        found["pipeline_p99_ms"] = percentile(pipeline_ms, 99)
    return found


def _summary(latencies_ms: list[float]) -> dict[str, float]:
    return {
        "count": len(latencies_ms),
        "p50_ms": percentile(latencies_ms, 50),
        "p99_ms": percentile(latencies_ms, 99),
        "max_ms": max(latencies_ms),
    }


# -- 4. memory ------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryParams:
    in_flight: int = 16
    reference_bytes: int = 5 * _MB
    partitions: int = 8
    top_allocations: int = 5


async def memory(env: Env, params: MemoryParams) -> dict[str, Any]:
    """Resident memory added per request held in flight, each with its own reference.

    The backend holds every call until all `in_flight` are inside it; the growth of the
    process's RSS from before the requests to then, divided by their number, is the answer.
    tracemalloc says where in the code that memory was allocated.
    """
    references = [
        write_reference(env.workdir, params.reference_bytes, seed=1 + i)
        for i in range(params.in_flight)
    ]
    backend = HoldingBackend()
    async with fresh_topics(env.bootstrap, params.partitions) as topics:
        messages = await request_messages(env.codec, topics.requests, references, params.in_flight)
        warmup_request = clone_request(env.small_reference(), request_id="warmup")
        warmup = [await encode_request(env.codec, topics.requests, warmup_request)]
        producer = request_producer(env.bootstrap)
        await producer.start()
        clock = ArrivalClock(env.bootstrap, [topics.audio_ready, topics.failed])
        try:
            async with clock, _runner(env, WORKER, topics, params.in_flight, backend) as runner:
                await _send_and_wait(producer, topics.requests, warmup, clock, runner, 0)
                held = await _held_memory(producer, topics.requests, messages, backend, runner)
                backend.release()
                await while_running(clock.wait_for({m.key for m in messages}, 60), runner)
                gc.collect()
                after = rss_bytes()
        finally:
            await producer.stop()
    per_request = (held["rss"] - held["baseline"]) / params.in_flight
    return {
        "params": asdict(params),
        "reference_mb": references[0].size_bytes / _MB,
        "rss_per_in_flight_mb": per_request / _MB,
        "rss_retained_per_request_mb": (after - held["baseline"]) / params.in_flight / _MB,
        "traced_per_in_flight_mb": held["traced"] / params.in_flight / _MB,
        "top_allocations": _top_sites(held["snapshot"], params),
    }


async def _held_memory(
    producer: AIOKafkaProducer,
    topic: str,
    messages: Sequence[Message],
    backend: HoldingBackend,
    runner: asyncio.Task[None],
) -> dict[str, Any]:
    """RSS before the requests and once all of them are held by the backend."""
    gc.collect()
    baseline = rss_bytes()
    backend.hold()
    tracemalloc.start()
    try:
        for message in messages:
            await producer.send(topic, message.value, key=message.key, headers=message.headers)
        await while_running(asyncio.wait_for(backend.wait_held(len(messages)), 60), runner)
        gc.collect()
        rss = rss_bytes()
        traced, _ = tracemalloc.get_traced_memory()
        snapshot = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    return {"baseline": baseline, "rss": rss, "traced": traced, "snapshot": snapshot}


def _top_sites(snapshot: tracemalloc.Snapshot, params: MemoryParams) -> list[dict[str, Any]]:
    """The allocation sites holding the most memory, per in-flight request."""
    stats = snapshot.statistics("lineno")[: params.top_allocations]
    return [
        {
            "site": f"{_short(stat.traceback[0].filename)}:{stat.traceback[0].lineno}",
            "mb_per_request": stat.size / params.in_flight / _MB,
        }
        for stat in stats
    ]


def _short(filename: str) -> str:
    """A site's file relative to site-packages, the standard library or the repository."""
    if "site-packages/" in filename:
        return filename.rsplit("site-packages/", 1)[-1]
    for root in (_STDLIB, _REPO):
        if filename.startswith(root):
            return filename.removeprefix(root)
    return filename


# -- 5. soak --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SoakParams:
    requests: int = 20_000
    checkpoints: tuple[int, ...] = (1_000, 5_000, 10_000, 20_000)
    window: int = 1_000  # each checkpoint's latencies: of the requests just before it
    # Well below the worker's throughput on a busy 2-core machine: latency then shows the
    # worker, not a backlog.
    rate_per_s: float = 100.0
    latency_seconds: float = 0.001
    max_in_flight: int = 16
    partitions: int = 8
    target_rss_growth: float = 0.10


async def soak(env: Env, params: SoakParams) -> dict[str, Any]:
    """One worker, many requests at a steady rate through a fast backend double; at each
    checkpoint (all requests so far answered) the process's resident memory, open file
    descriptors, asyncio tasks and the latency (send to outcome) of the last `window` requests.

    The worker runs in this process, so the figures include the harness (its producer and
    reader, the encoded requests made up front); what it notes per request (send and arrival
    times, the double's call times) is dropped at each checkpoint, so growth is the worker's."""
    reference = env.small_reference()
    backend = FixedLatencyBackend(params.latency_seconds)
    async with fresh_topics(env.bootstrap, params.partitions) as topics:
        messages = await request_messages(env.codec, topics.requests, [reference], params.requests)
        producer = request_producer(env.bootstrap)
        await producer.start()
        clock = ArrivalClock(env.bootstrap, [topics.audio_ready, topics.failed])
        points = []
        try:
            async with clock, _runner(env, WORKER, topics, params.max_in_flight, backend) as runner:
                done = 0
                for checkpoint in params.checkpoints:
                    batch = messages[done:checkpoint]
                    sent = await _send_and_wait(
                        producer, topics.requests, batch, clock, runner, params.rate_per_s
                    )
                    done = checkpoint
                    points.append(_soak_point(checkpoint, sent, clock, params.window))
                    clock.arrived.clear()
                    backend.call_starts.clear()
        finally:
            await producer.stop()
        outcomes = await _outcomes(env, topics, set(), timings=False)
    growth = points[-1]["rss_mb"] / points[0]["rss_mb"] - 1
    return {
        "params": asdict(params),
        "points": points,
        "rss_growth": growth,
        "failed": outcomes["failed"],
        "met": growth < params.target_rss_growth,
    }


def _soak_point(
    requests: int, sent: dict[bytes, float], clock: ArrivalClock, window: int
) -> dict[str, Any]:
    recent = list(sent.items())[-window:]
    latencies = [(clock.arrived[key] - at) * 1000 for key, at in recent]
    gc.collect()
    return {
        "requests": requests,
        "rss_mb": rss_bytes() / _MB,
        "open_fds": open_fds(),
        "tasks": len(asyncio.all_tasks()),
        **_summary(latencies),
    }
