"""Backends for the benchmarks: every cost of a request except inference.

Each answers with one small WAV, encoded once, so what the worker does afterwards (read the
audio's header, store it, announce it) is what it would do with a real result.
"""

import asyncio
import io
import time

import numpy as np
import soundfile

from consumer.backends.base import BackendSettings, CloneJob, CloneResult

_SAMPLE_RATE = 24_000  # the engine's output rate
_RESULT_SECONDS = 0.25


def small_wav(seconds: float = _RESULT_SECONDS, sample_rate: int = _SAMPLE_RATE) -> bytes:
    """A mono 16-bit WAV of silence."""
    buffer = io.BytesIO()
    samples = np.zeros(round(seconds * sample_rate), dtype=np.int16)
    soundfile.write(buffer, samples, sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


class FixedLatencyBackend:
    """Answers every call after `latency_seconds` (0: at once) with the same small WAV.

    `call_starts` holds the wall-clock time (`time.time()`) each call began, for throughput
    measured from the first request the worker started.
    """

    def __init__(self, latency_seconds: float = 0.0) -> None:
        self.name = "bench"
        self.timeout_seconds = BackendSettings().timeout_seconds
        self.call_starts: list[float] = []
        self._latency = latency_seconds
        self._result = CloneResult(
            audio=small_wav(),
            cold_start=False,
            model_load_seconds=None,
            container_id=None,
            inference_seconds=latency_seconds,
        )

    async def start(self) -> None:
        """Nothing to acquire."""

    async def clone(self, job: CloneJob, timeout: float) -> CloneResult:  # noqa: ASYNC109
        self.call_starts.append(time.time())
        if self._latency > 0:
            await asyncio.sleep(self._latency)
        return self._result

    async def ready(self) -> bool:
        return True

    async def close(self) -> None:
        """Nothing to release."""


class HoldingBackend(FixedLatencyBackend):
    """Once `hold()` is called, holds every call, and so its job's reference audio, until
    `release()`; answers at once before that (a warm-up passes through).

    `wait_held(n)` returns once `n` calls are being held: the worker then has `n` requests in
    flight, each with its reference in memory, which is what the memory benchmark measures.
    """

    def __init__(self) -> None:
        super().__init__()
        self._gate: asyncio.Event | None = None
        self._held = 0
        self._changed = asyncio.Condition()

    def hold(self) -> None:
        self._gate = asyncio.Event()

    def release(self) -> None:
        if self._gate is not None:
            self._gate.set()

    async def clone(self, job: CloneJob, timeout: float) -> CloneResult:  # noqa: ASYNC109
        if self._gate is not None:
            async with self._changed:
                self._held += 1
                self._changed.notify_all()
            await self._gate.wait()
        return await super().clone(job, timeout)

    async def wait_held(self, count: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self._held >= count)
