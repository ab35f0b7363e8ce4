"""The `local` backend: the Modal service's engine (`modal_app.engine`) run in this process.

For development, tests and single-machine deployments; needs the `engine` extra (torch,
qwen-tts). torch is imported when the backend starts, never before, so a worker without the
extra still imports `consumer.backends`.

- `start()` loads every served size, so a misconfigured worker fails at start with a message
  saying what to set. Weights come from a local directory or the Hugging Face cache, never the
  network, so that failure is immediate even offline. Sizes configured with the same weights
  share one engine.
- Each engine has a pool of `max_concurrent` threads, one per call it serves, so the worker's
  in-flight requests share one engine: with fast generation their sentence chunks are generated
  in one continuous batch; with stock generation they take turns. Inference never blocks the
  event loop, and two sizes can generate side by side.
- A call's deadline goes to the engine, which drops its rows from the batch when it passes
  (fast generation; a stock generation runs to its end, its result discarded); the call reports
  `BackendTimeout` at once either way. Calls that time out while queued never run.
"""

import asyncio
import itertools
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

from consumer.backends.base import CloneJob, CloneResult
from consumer.backends.errors import (
    BackendTimeout,
    BackendUnavailable,
    GenerationFailed,
    InvalidInput,
)
from consumer.backends.settings import BackendSettings, LocalBackendSettings
from modal_app.contract import CloneInput, CloneOutput
from modal_app.errors import RequestStopped
from producer.logs import output_logged
from schemas.vocabulary import ModelName, ModelSize, VoicecloneError

if TYPE_CHECKING:
    from modal_app.engine import Engine

log = structlog.get_logger(__name__)

# Per size: the variable naming its weights and the official hub id, for error messages.
_SIZE_VARIABLES = {
    ModelSize.LARGE: "VOICECLONE_BACKEND__LOCAL__MODEL_1_7B",
    ModelSize.SMALL: "VOICECLONE_BACKEND__LOCAL__MODEL_0_6B",
}


@dataclass(frozen=True)
class _Weights:
    """One model to load: as configured, where it was found, and the sizes it serves."""

    configured: str  # a directory or a hub id
    folder: str
    sizes: list[str]


@dataclass(eq=False)  # hashed by identity: sizes with the same weights share one
class _LoadedModel:
    """One engine, the threads that call it, and a count of the calls started on it."""

    engine: "Engine"
    executor: ThreadPoolExecutor
    calls: "itertools.count[int]" = field(default_factory=itertools.count)

    def clone(self, request: CloneInput, deadline: float) -> tuple[CloneOutput, bool]:
        """Runs in `executor`: the first call to start on this engine is its cold start
        (`next` on a count is atomic, and calls run on many threads)."""
        cold_start = next(self.calls) == 0
        return self.engine.clone(request, deadline=deadline), cold_start


class LocalBackend:
    """Clones with Qwen3-TTS engines loaded in this process, one thread per engine."""

    name = "local"

    def __init__(self, settings: BackendSettings) -> None:
        self._settings = settings
        self.timeout_seconds = settings.timeout_seconds
        self._models: dict[str, _LoadedModel] = {}  # size → its loaded model

    async def start(self) -> None:
        if self._models:
            return
        local = self._settings.local
        found = await asyncio.to_thread(_find_weights, local)  # imports torch: seconds
        try:
            for weights in found:
                model = await _load_model(weights, local)
                self._models.update(dict.fromkeys(weights.sizes, model))
        except BaseException:
            await self.close()  # the caller never gets a started backend to close
            raise

    async def clone(self, job: CloneJob, timeout: float) -> CloneResult:  # noqa: ASYNC109
        model = self._model(job.model)
        output, cold_start = await _run(model, clone_input(job), timeout)
        return CloneResult(
            audio=output.audio,
            cold_start=cold_start,
            model_load_seconds=model.engine.load_seconds,
            container_id=None,  # no container: the engine runs in the worker's process
            inference_seconds=output.inference_seconds,
            capped=output.capped,
        )

    async def ready(self) -> bool:
        return bool(self._models)

    async def close(self) -> None:
        """Stop the engine threads. A generation already running ends on its own (threads cannot
        be interrupted); calls still queued are dropped, so close only after draining."""
        models, self._models = self._models, {}
        for model in set(models.values()):
            model.executor.shutdown(wait=False, cancel_futures=True)

    def _model(self, size: str) -> _LoadedModel:
        if not self._models:
            raise RuntimeError("LocalBackend.start() must be awaited before use")
        model = self._models.get(size)
        if model is None:
            served = ", ".join(sorted(self._models))
            raise InvalidInput(f"model {size!r} is not served by this worker (it serves {served})")
        return model


def clone_input(job: CloneJob) -> CloneInput:
    """The engine's request for `job`; no transcript selects x-vector-only cloning."""
    return CloneInput(
        text=job.text,
        language=job.language,
        reference_audio=job.reference_audio,
        reference_text=job.reference_text,
        params=job.generation,
        output_format=job.output_format,
    )


async def _run(model: _LoadedModel, request: CloneInput, budget: float) -> tuple[CloneOutput, bool]:
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + budget
    try:
        async with asyncio.timeout(budget):
            return await loop.run_in_executor(model.executor, model.clone, request, deadline)
    except TimeoutError as exc:
        raise BackendTimeout(
            f"the local engine gave no answer within {budget:.1f} s "
            "(the engine drops it from its batch, or finishes and discards it)"
        ) from exc
    except RequestStopped as exc:  # its deadline passed in the engine
        raise BackendTimeout(str(exc)) from exc
    except VoicecloneError:
        raise  # the engine's own errors already know their code
    except Exception as exc:
        raise GenerationFailed(f"the local engine failed ({type(exc).__name__}: {exc})") from exc


def _find_weights(settings: LocalBackendSettings) -> list[_Weights]:
    """Every served model's folder, all found before any is loaded (loading takes a while)."""
    grouped = _sizes_by_weights(settings.models())
    if not grouped:
        variables = " or ".join(_SIZE_VARIABLES.values())
        raise BackendUnavailable(
            f"the local backend serves no model size; set {variables}", transient=False
        )
    _prepare_torch(settings)
    return [
        _Weights(configured, _weights_folder(configured, sizes), sizes)
        for configured, sizes in grouped.items()
    ]


def _sizes_by_weights(models: dict[str, str]) -> dict[str, list[str]]:
    """Weights → the sizes configured with them, so each distinct model loads once."""
    grouped: dict[str, list[str]] = {}
    for size, weights in models.items():
        folder = os.path.expanduser(weights)
        key = os.path.realpath(folder) if os.path.isdir(folder) else weights
        grouped.setdefault(key, []).append(size)
    return grouped


def _prepare_torch(settings: LocalBackendSettings) -> None:
    """Import torch and the engine, and check the configured device exists."""
    try:
        import torch

        _import_engine()  # fail here once, not per size
    except ImportError as exc:
        raise BackendUnavailable(
            "the local backend needs the engine extra (torch, qwen-tts): "
            f"`uv sync --extra engine` ({exc})",
            transient=False,
        ) from exc
    if settings.device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendUnavailable(
            f"VOICECLONE_BACKEND__LOCAL__DEVICE is {settings.device!r} but torch sees no CUDA "
            'device; set it to "auto" or "cpu"',
            transient=False,
        )


def _import_engine() -> None:
    """Import the engine, turning what its libraries print or log on the way into our log lines.

    qwen-tts imports its 25 Hz speech tokenizer whatever the model, and with it a flash-attn
    banner printed on stdout (about that tokenizer's Whisper encoder) and the `sox` package (for
    its x-vector extractor's loudness normalisation), whose import runs `sox -h` in a shell that
    says "sox: not found" on stderr, then logs a nine-line warning, where SoX is not installed.
    The Qwen3-TTS models served here use the 12 Hz tokenizer, which needs neither flash-attn nor
    SoX (the program is no requirement): the banner and the shell's line become one DEBUG line,
    and the warning is dropped.
    """
    logging.getLogger("sox").disabled = True
    with output_logged("engine_import_output"):
        import modal_app.engine  # noqa: F401
    # transformers writes its records with a plain-text stderr handler of its own: hand them to
    # the root logger's instead, which renders them as ours.
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_default_handler()
    transformers_logging.enable_propagation()


async def _load_model(weights: _Weights, settings: LocalBackendSettings) -> _LoadedModel:
    """Load `weights` in the thread that will run it, off the event loop."""
    executor = ThreadPoolExecutor(
        max_workers=settings.max_concurrent,
        thread_name_prefix=f"engine-{'-'.join(weights.sizes)}",
        initializer=_set_torch_threads,
        initargs=(settings.threads,),
    )
    try:
        engine = await asyncio.get_running_loop().run_in_executor(
            executor, _load_engine, weights, settings
        )
    except BaseException:
        executor.shutdown(wait=False, cancel_futures=True)
        raise
    log.info(
        "local_model_loaded",
        sizes=weights.sizes,
        model=weights.configured,
        device=str(engine.device),
        load_seconds=round(engine.load_seconds, 2),
    )
    return _LoadedModel(engine, executor)


def _set_torch_threads(threads: int | None) -> None:
    """Runs first in each engine thread: torch's thread count is set per calling thread."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _load_engine(weights: _Weights, settings: LocalBackendSettings) -> "Engine":
    from modal_app.engine import Engine, EngineOptions

    device = None if settings.device == "auto" else settings.device
    options = EngineOptions(generation=settings.generation)
    try:
        engine = Engine.load(weights.folder, device=device, options=options)
    except Exception as exc:
        problem = f"loading it failed ({type(exc).__name__}: {exc})"
        raise _unloadable(weights.sizes, weights.configured, problem) from exc
    if engine.device.type == "cuda":
        engine.warm_up()  # first-use CUDA setup now rather than in the first request
    return engine


def _weights_folder(weights: str, sizes: list[str]) -> str:
    """The folder holding `weights`: the directory itself, or a hub id's snapshot in the cache.

    Never downloads: `local_files_only` answers at once, where a download attempt offline would
    hang on network timeouts before failing.
    """
    folder = os.path.expanduser(weights)
    if os.path.isdir(folder):
        return folder
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return snapshot_download(weights, local_files_only=True)
    except HFValidationError as exc:  # not a hub id, so meant as a path
        raise _unloadable(sizes, weights, "there is no such directory") from exc
    except LocalEntryNotFoundError as exc:
        problem = (
            "it is neither a directory nor a hub id in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}); the worker never downloads weights"
        )
        raise _unloadable(sizes, weights, problem) from exc


def _unloadable(sizes: list[str], weights: str, problem: str) -> BackendUnavailable:
    """A permanent start failure that says how to point the worker at a model."""
    variables = " / ".join(f"{_SIZE_VARIABLES[ModelSize(size)]}=/path/to/model" for size in sizes)
    downloads = " / ".join(
        f"`uv run hf download {ModelName.of_size(size).hub_id}`" for size in sizes
    )
    return BackendUnavailable(
        f"the local backend cannot load the {' and '.join(sizes)} model from {weights!r}: "
        f"{problem}. Point {variables} at a model directory (set it empty to not serve that "
        f"size), put the official weights in the Hugging Face cache first ({downloads}), or, "
        "to try the pipeline offline, build the synthetic test model (it speaks noise) with "
        "`uv run python -m modal_app.synthetic DIR` and point at DIR.",
        transient=False,
    )
