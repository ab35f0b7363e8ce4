"""The `local` backend on the tiny model: the real engine, loaded and run in this process."""

import asyncio
import hashlib
import io
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import soundfile
from prometheus_client import CollectorRegistry

from consumer.backends import (
    Backend,
    BackendSettings,
    BackendTimeout,
    BackendUnavailable,
    CloneJob,
    ErrorCode,
    GenerationParams,
    InvalidInput,
    make_backend,
)
from consumer.backends.local import LocalBackend
from consumer.telemetry import Metrics
from tests.consumer.backends.conftest import CloneJobFactory
from tests.fixtures.model import REFERENCE_TRANSCRIPT, SAMPLE_RATE, frames_to_samples

pytestmark = pytest.mark.engine

FRAMES = 6  # max_new_tokens: 5 frames, 0.4 s of audio from the fixed-length tiny model


def local_settings(**local: Any) -> BackendSettings:
    """Settings of a local backend serving only the sizes given."""
    sizes = {"model_1_7b": "", "model_0_6b": ""}
    return BackendSettings(kind="local", local={**sizes, **local})


@pytest.fixture
def engine_extra() -> None:
    """Skip where the engine extra (torch, qwen-tts) is not installed."""
    pytest.importorskip("qwen_tts", reason="needs the engine extra")


@pytest.fixture
async def backend(tiny_model_dir: Path) -> AsyncIterator[Backend]:
    """A started backend serving the tiny model as 1.7B only."""
    started = make_backend(local_settings(model_1_7b=str(tiny_model_dir)))
    await started.start()
    yield started
    await started.close()


@pytest.fixture
async def fast_backend(tiny_model_dir: Path) -> AsyncIterator[LocalBackend]:
    """A started backend serving the tiny model as 1.7B only, through the fast loop."""
    started = make_backend(local_settings(model_1_7b=str(tiny_model_dir), generation="fast"))
    assert isinstance(started, LocalBackend)
    await started.start()
    yield started
    await started.close()


@pytest.fixture
def voice_job(clone_job: CloneJobFactory, reference_wav: bytes) -> CloneJobFactory:
    """A short job in the tiny model's reference voice; keyword arguments override."""

    def build(**overrides: Any) -> CloneJob:
        fields: dict[str, Any] = {
            "text": "Hello there.",
            "reference_audio": reference_wav,
            "reference_sha256": hashlib.sha256(reference_wav).hexdigest(),
            "reference_text": REFERENCE_TRANSCRIPT,
            "generation": GenerationParams(max_new_tokens=FRAMES, seed=1),
        }
        return clone_job(**{**fields, **overrides})

    return build


def test_building_the_backend_imports_no_torch() -> None:
    """A worker without the engine extra can still import and build backends."""
    code = (
        "import sys\n"
        "from consumer.backends import BackendSettings, make_backend\n"
        "backend = make_backend(BackendSettings(kind='local'))\n"
        "assert backend.name == 'local', backend.name\n"
        "assert 'torch' not in sys.modules, 'building the local backend imported torch'\n"
    )
    root = Path(__file__).resolve().parents[3]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=60)


@pytest.mark.usefixtures("engine_extra")
def test_importing_the_engine_writes_only_json_log_lines() -> None:
    """qwen-tts prints a banner and its `sox` import a shell's complaint; transformers logs with
    a handler of its own: in a worker's process all of it comes out as JSON lines."""
    code = (
        "import logging\n"
        "from producer.logs import LogFormat, LogLevel, configure_logging\n"
        "from consumer.backends.local import _import_engine\n"
        "configure_logging(LogFormat.JSON, LogLevel.DEBUG)\n"
        "_import_engine()\n"
        "logging.getLogger('transformers.generation').warning('from transformers')\n"
    )
    root = Path(__file__).resolve().parents[3]
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=180
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    entries = [json.loads(line) for line in done.stderr.splitlines()]
    assert {"event": "from transformers", "logger": "transformers.generation"}.items() <= (
        entries[-1].items()
    )


@pytest.mark.parametrize("audio_format", ["WAV", "FLAC"])
async def test_clone_returns_audio_in_the_requested_format(
    backend: Backend, voice_job: CloneJobFactory, audio_format: str
) -> None:
    assert isinstance(backend, LocalBackend)
    assert await backend.ready()

    result = await backend.clone(voice_job(output_format=audio_format), timeout=60)

    samples, sample_rate = soundfile.read(io.BytesIO(result.audio))
    assert soundfile.info(io.BytesIO(result.audio)).format == audio_format
    assert sample_rate == SAMPLE_RATE
    assert len(samples) == frames_to_samples(FRAMES)
    assert result.container_id is None
    assert (result.model_load_seconds or 0) > 0
    assert (result.inference_seconds or 0) > 0


async def test_without_a_transcript_clones_from_the_speaker_embedding(
    backend: Backend, voice_job: CloneJobFactory
) -> None:
    result = await backend.clone(voice_job(reference_text=None), timeout=60)

    samples, _ = soundfile.read(io.BytesIO(result.audio))
    assert len(samples) == frames_to_samples(FRAMES)


async def test_first_call_per_engine_is_the_cold_start_and_sizes_share_weights(
    tiny_model_dir: Path, voice_job: CloneJobFactory
) -> None:
    same = str(tiny_model_dir)
    backend = make_backend(local_settings(model_1_7b=same, model_0_6b=f"{same}/"))
    await backend.start()
    try:
        answers = [
            (await backend.clone(voice_job(model=size), timeout=60)).cold_start
            for size in ("1.7B", "1.7B", "0.6B")
        ]
    finally:
        await backend.close()

    # One engine serves both sizes, so the 0.6B call finds it warm.
    assert answers == [True, False, False]
    assert not await backend.ready()
    await backend.close()  # twice is fine


async def test_unsupported_language_is_invalid_input_with_its_code(
    backend: Backend, voice_job: CloneJobFactory
) -> None:
    with pytest.raises(InvalidInput) as caught:
        await backend.clone(voice_job(language="Klingon"), timeout=60)

    assert caught.value.code == ErrorCode.UNSUPPORTED_LANGUAGE
    assert not caught.value.transient


async def test_a_size_not_served_is_invalid_input(
    backend: Backend, voice_job: CloneJobFactory
) -> None:
    with pytest.raises(InvalidInput, match=r"'0\.6B' is not served") as caught:
        await backend.clone(voice_job(model="0.6B"), timeout=60)

    assert caught.value.code == ErrorCode.INVALID_REQUEST


async def test_a_call_past_its_deadline_times_out_and_the_engine_stays_usable(
    backend: Backend, voice_job: CloneJobFactory
) -> None:
    with pytest.raises(BackendTimeout) as caught:
        await backend.clone(voice_job(), timeout=0.001)
    # The abandoned generation finishes in its thread; the next call waits for it, then runs.
    later = await backend.clone(voice_job(), timeout=60)

    assert (caught.value.code, caught.value.transient) == (ErrorCode.INFERENCE_TIMEOUT, True)
    assert len(soundfile.read(io.BytesIO(later.audio))[0]) == frames_to_samples(FRAMES)


async def test_threads_setting_applies_in_the_engine_thread(tiny_model_dir: Path) -> None:
    import torch

    # The tiny-model fixture runs torch on 1 thread; ask for another count to see it applied.
    backend = make_backend(local_settings(model_1_7b=str(tiny_model_dir), threads=2))
    await backend.start()
    try:
        assert isinstance(backend, LocalBackend)
        engine_thread = backend._models["1.7B"].executor  # where inference runs
        threads = engine_thread.submit(torch.get_num_threads).result(timeout=10)
    finally:
        await backend.close()
        torch.set_num_threads(1)  # torch may carry the count over to other threads

    assert threads == 2


async def test_generation_setting_reaches_the_engine(
    fast_backend: LocalBackend, voice_job: CloneJobFactory
) -> None:
    assert fast_backend._models["1.7B"].engine.options.generation == "fast"
    result = await fast_backend.clone(voice_job(), timeout=60)

    assert soundfile.info(io.BytesIO(result.audio)).frames == frames_to_samples(FRAMES)


async def test_a_runaway_generation_is_reported_capped_and_counted(
    fast_backend: LocalBackend, voice_job: CloneJobFactory
) -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    # The tiny model never says its end token: given room, its row runs to its frame cap.
    runaway = voice_job(generation=GenerationParams(max_new_tokens=500, seed=1))
    results = []
    for job in (voice_job(), runaway):
        with metrics.backend_call(fast_backend.name, "1.7B") as call:
            call.result = await fast_backend.clone(job, timeout=60)
        results.append(call.result)

    assert [result.capped for result in results] == [False, True]
    labels = {"backend": "local", "model": "1.7B"}
    assert registry.get_sample_value("voiceclone_generation_capped_total", labels) == 1


def eventually(condition: Callable[[], bool], seconds: float = 30.0) -> bool:
    """Whether `condition` holds within `seconds` (polled)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


async def test_in_flight_requests_share_one_engine_batch(
    fast_backend: LocalBackend, voice_job: CloneJobFactory
) -> None:
    engine = fast_backend._models["1.7B"].engine
    # Long enough (20+ frames) to overlap however the threads are scheduled.
    jobs = [
        voice_job(generation=GenerationParams(max_new_tokens=20 + index, seed=index))
        for index in range(6)
    ]
    results = await asyncio.gather(*(fast_backend.clone(job, timeout=60) for job in jobs))

    lengths = [soundfile.info(io.BytesIO(result.audio)).frames for result in results]
    assert lengths == [frames_to_samples(20 + index) for index in range(6)]
    stats = engine.generation_stats()
    assert stats is not None
    assert stats.largest_batch >= 2  # requests ran in one batch, not one after another


async def test_a_call_past_its_deadline_leaves_the_engine_batch(
    fast_backend: LocalBackend, voice_job: CloneJobFactory
) -> None:
    stats = fast_backend._models["1.7B"].engine.generation_stats()
    assert stats is not None
    # A long text: its frame cap lets the never-ending tiny model run for many seconds.
    endless = voice_job(
        text=" ".join(["A long sentence that goes on and on."] * 8),
        generation=GenerationParams(max_new_tokens=4000),
    )
    with pytest.raises(BackendTimeout):
        await fast_backend.clone(endless, timeout=0.5)
    # The engine dropped its rows (it polls between frames), rather than ran them out.
    assert await asyncio.to_thread(eventually, lambda: stats.rows_stopped >= 1)
    later = await fast_backend.clone(voice_job(), timeout=60)

    assert soundfile.info(io.BytesIO(later.audio)).frames == frames_to_samples(FRAMES)


ACTIONABLE = (
    "VOICECLONE_BACKEND__LOCAL__MODEL_1_7B=/path/to/model",
    "set it empty to not serve that size",
    "uv run python -m modal_app.synthetic DIR",
)


def assert_actionable(error: BackendUnavailable, *details: str) -> None:
    assert not error.transient
    for detail in (*ACTIONABLE, *details):
        assert detail in str(error)


@pytest.mark.usefixtures("engine_extra")
async def test_missing_model_directory_fails_start(tmp_path: Path) -> None:
    backend = make_backend(local_settings(model_1_7b=str(tmp_path / "missing")))

    with pytest.raises(BackendUnavailable) as caught:
        await backend.start()

    assert_actionable(caught.value, "no such directory")
    assert not await backend.ready()


@pytest.mark.usefixtures("engine_extra")
async def test_hub_id_not_in_the_cache_fails_start_at_once_without_the_network(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lookups: list[str] = []

    def refuse(host: str, *args: object, **kwargs: object) -> Any:
        lookups.append(host)
        raise OSError("no network in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    backend = make_backend(local_settings(model_1_7b="voiceclone-tests/not-in-any-cache"))

    started = time.perf_counter()
    with pytest.raises(BackendUnavailable) as caught:
        await backend.start()

    assert time.perf_counter() - started < 5
    assert lookups == []
    assert_actionable(
        caught.value,
        "neither a directory nor a hub id in the Hugging Face cache",
        "uv run hf download Qwen/Qwen3-TTS-12Hz-1.7B-Base",
    )


async def test_a_model_that_fails_to_load_fails_start_and_releases_the_others(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    backend = make_backend(
        local_settings(model_1_7b=str(tiny_model_dir), model_0_6b=str(not_a_model))
    )

    with pytest.raises(BackendUnavailable, match="loading it failed") as caught:
        await backend.start()

    assert "VOICECLONE_BACKEND__LOCAL__MODEL_0_6B=/path/to/model" in str(caught.value)
    assert not caught.value.transient
    assert not await backend.ready()
    # The 1.7B engine, loaded first, had its thread stopped.
    for thread in threading.enumerate():
        if thread.name.startswith("engine-"):
            thread.join(timeout=10)
            assert not thread.is_alive(), thread.name
