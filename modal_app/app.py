"""The Qwen3-TTS GPU service on Modal: one app file for both model sizes.

The size is chosen when the module is imported, from `VOICECLONE_MODEL_SIZE`, and fixes the
app name, the model and the GPU list (see `modal_app.profiles`). Run from the repository root:

    modal run -m modal_app.app::download_models             # once: both models into the Volume
    VOICECLONE_MODEL_SIZE=1.7B modal deploy -m modal_app.app  # voiceclone-qwen3-tts-1-7b, A10G
    VOICECLONE_MODEL_SIZE=0.6B modal deploy -m modal_app.app  # voiceclone-qwen3-tts-0-6b, T4

Deploy-time settings, all optional: `VOICECLONE_MODAL_GPUS` (comma-separated, first choice
first), `VOICECLONE_MODAL_GPU_SNAPSHOT` (`0` for CPU-only memory snapshots),
`VOICECLONE_MODAL_MIN_CONTAINERS`, `VOICECLONE_MODAL_SCALEDOWN_SECONDS`,
`VOICECLONE_MODAL_GENERATION` (`stock` or `fast`: the engine's generation loop),
`VOICECLONE_MODAL_MAX_INPUTS` and `VOICECLONE_MODAL_TARGET_INPUTS` (inputs a container serves at
once with the fast loop, which batches them; defaults per size in `modal_app.profiles`),
`VOICECLONE_MODAL_COMPILE_STEPS` (`1`: the fast loop's steps through `torch.compile`),
`VOICECLONE_MODAL_TRACE_DECODER` (`0`: the speech decoder stays eager; see
`modal_app.decoder_graph`).

Containers restore from a memory snapshot taken after the model is loaded (with its GPU memory
where Modal's GPU snapshots are enabled), so a cold start skips import, load and warm-up.
"""

import itertools
import logging
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import modal

from modal_app.contract import CloneInput, ContainerFacts, EngineOptions, ServiceResult
from modal_app.profiles import DEFAULT_SIZE, PROFILES, ModelProfile, profile_for
from modal_app.seed_compat import SeedCompatible
from schemas.vocabulary import GenerationParams

logger = logging.getLogger(__name__)

CACHE_MOUNT = "/cache"
HF_HOME = f"{CACHE_MOUNT}/huggingface"
VOLUME_NAME = "voiceclone-hf-cache"
SYSTEM_PACKAGES = ("libsndfile1", "sox", "ffmpeg")


@dataclass(frozen=True)
class DeploySettings:
    """Everything this module reads from the environment, read once at import."""

    profile: ModelProfile
    gpus: tuple[str, ...]
    gpu_snapshot: bool = True
    min_containers: int = 0
    scaledown_seconds: int = 300
    generation: str = "stock"  # EngineOptions.generation: "stock" or "fast"
    max_inputs: int = 1  # with the fast loop: inputs one container serves at once
    target_inputs: int = 1  # with the fast loop: Modal scales out past this many
    compile_steps: bool = False  # EngineOptions.compile_steps (experimental)
    trace_decoder: bool = True  # EngineOptions.trace_decoder

    @property
    def concurrency(self) -> tuple[int, int]:
        """(max, target) inputs per container. The stock loop serves one call at a time, so
        more inputs would only queue inside a container instead of starting another."""
        if self.generation != "fast":
            return 1, 1
        return self.max_inputs, min(self.target_inputs, self.max_inputs)

    timeout_seconds: int = 1800  # per call: long texts run to many minutes of audio
    startup_timeout_seconds: int = 900  # first boot on a new snapshot: load from the Volume


def settings_from_env(environ: Mapping[str, str] = os.environ) -> DeploySettings:
    profile = profile_for(environ.get("VOICECLONE_MODEL_SIZE", DEFAULT_SIZE))
    gpus = environ.get("VOICECLONE_MODAL_GPUS", "")
    return DeploySettings(
        profile=profile,
        gpus=tuple(gpu.strip() for gpu in gpus.split(",") if gpu.strip()) or profile.gpus,
        gpu_snapshot=_flag(environ.get("VOICECLONE_MODAL_GPU_SNAPSHOT", "1")),
        min_containers=int(environ.get("VOICECLONE_MODAL_MIN_CONTAINERS", "0")),
        scaledown_seconds=int(environ.get("VOICECLONE_MODAL_SCALEDOWN_SECONDS", "300")),
        generation=EngineOptions(
            generation=environ.get("VOICECLONE_MODAL_GENERATION", "stock")
        ).generation,
        max_inputs=_positive(environ, "VOICECLONE_MODAL_MAX_INPUTS", profile.max_inputs),
        target_inputs=_positive(environ, "VOICECLONE_MODAL_TARGET_INPUTS", profile.target_inputs),
        compile_steps=_flag(environ.get("VOICECLONE_MODAL_COMPILE_STEPS", "0")),
        trace_decoder=_flag(environ.get("VOICECLONE_MODAL_TRACE_DECODER", "1")),
    )


def _positive(environ: Mapping[str, str], name: str, default: int) -> int:
    value = int(environ.get(name, default))
    if value < 1:
        raise ValueError(f"{name} must be 1 or more, got {value}")
    return value


def _flag(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered not in {"1", "true", "yes", "0", "false", "no"}:
        raise ValueError(f"Expected a boolean (1/0, true/false), got {value!r}")
    return lowered in {"1", "true", "yes"}


def service_options(settings: DeploySettings, volume: modal.Volume) -> dict[str, Any]:
    """Keyword arguments for `@app.cls`: resources, limits and snapshotting."""
    options: dict[str, Any] = {
        "gpu": list(settings.gpus),
        "volumes": {CACHE_MOUNT: volume},
        "timeout": settings.timeout_seconds,
        "startup_timeout": settings.startup_timeout_seconds,
        "scaledown_window": settings.scaledown_seconds,
        "min_containers": settings.min_containers,
        "enable_memory_snapshot": True,
    }
    if settings.gpu_snapshot:  # alpha: snapshot GPU memory too, so weights need no reload
        options["experimental_options"] = {"enable_gpu_snapshot": True}
    return options


SETTINGS = settings_from_env()
PROFILE = SETTINGS.profile

hf_cache = modal.Volume.from_name(VOLUME_NAME, create_if_missing=True)
image = (
    modal.Image.debian_slim(python_version="3.11")
    .apt_install(*SYSTEM_PACKAGES)
    # The locked versions of the project with its `engine` extra (run modal from the repo root).
    .uv_sync(extras=["engine"])
    .env(
        {
            "HF_HOME": HF_HOME,
            "VOICECLONE_MODEL_SIZE": PROFILE.size,  # the container imports this module too
            "VOICECLONE_MODAL_GENERATION": SETTINGS.generation,
            "VOICECLONE_MODAL_COMPILE_STEPS": "1" if SETTINGS.compile_steps else "0",
            "VOICECLONE_MODAL_TRACE_DECODER": "1" if SETTINGS.trace_decoder else "0",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    # The service speaks the contract's vocabulary (schemas.vocabulary: standard library only).
    .add_local_python_source("modal_app", "schemas")
)
app = modal.App(PROFILE.app_name, image=image)


@app.function(volumes={CACHE_MOUNT: hf_cache}, timeout=3600)
def download_models(sizes: str = "all") -> list[str]:
    """Fill the Volume's Hugging Face cache with each model (`all`, or e.g. `0.6B`)."""
    from huggingface_hub import snapshot_download  # only in the image

    chosen = (
        PROFILES.values() if sizes == "all" else [profile_for(size) for size in sizes.split(",")]
    )
    paths = [snapshot_download(profile.repo_id) for profile in chosen]
    hf_cache.commit()
    return paths


def resolve_model(model: str) -> str:
    """A local folder as is; a hub id from the Volume's cache only, never the network."""
    if os.path.isdir(model):
        return model
    from huggingface_hub import snapshot_download  # only in the image
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(model, local_files_only=True)
    except LocalEntryNotFoundError as exc:
        raise RuntimeError(
            f"{model} is not in the model Volume; run `modal run -m modal_app.app::download_models`"
        ) from exc


def container_id() -> str:
    return os.environ.get("MODAL_TASK_ID") or socket.gethostname()


MAX_INPUTS, TARGET_INPUTS = SETTINGS.concurrency


@app.cls(**service_options(SETTINGS, hf_cache))
@modal.concurrent(max_inputs=MAX_INPUTS, target_inputs=TARGET_INPUTS)
class Qwen3TTSService(SeedCompatible):
    """Voice cloning with one Qwen3-TTS model, loaded once per container.

    With the fast loop a container serves up to `MAX_INPUTS` calls at once, each on a thread of
    its own, and the engine generates all their sentence chunks in one continuous batch.

    `model` defaults to this app's size from the Volume; a folder path (e.g. a tiny model from
    `modal_app.synthetic`) is used as is, which is how the tests run this class with `.local()`.

    The seed's methods and HTTP endpoints come from `SeedCompatible` (`modal_app.seed_compat`).
    """

    model: str = modal.parameter(default="")

    @modal.enter(snap=True)
    def load(self) -> None:
        """Import, load and warm up before the snapshot, so restored containers skip all three."""
        from modal_app.engine import Engine  # deploying needs no torch

        logging.basicConfig(level=logging.INFO)  # containers have no logging set up otherwise
        started = time.perf_counter()
        # Without GPU snapshots no GPU is visible yet: load on the CPU, move in `attach`.
        device = None if SETTINGS.gpu_snapshot else "cpu"
        self._engine: Engine = Engine.load(
            resolve_model(self.model or PROFILE.repo_id),
            device=device,
            options=EngineOptions(
                generation=SETTINGS.generation,
                max_batch_rows=PROFILE.batch_rows,
                compile_steps=SETTINGS.compile_steps,
                trace_decoder=SETTINGS.trace_decoder,
            ),
        )
        if self._engine.device.type == "cuda":
            self._engine.warm_up()
        self._load_seconds = time.perf_counter() - started
        self._snapshot_task = os.environ.get("MODAL_TASK_ID")

    @modal.enter(snap=False)
    def attach(self) -> None:
        """After restore: move onto the GPU if the snapshot was CPU-only, and note the facts."""
        from modal_app.engine import pick_device

        started = time.perf_counter()
        # The task id changes when a container is restored from a snapshot taken by another.
        self._restored = self._snapshot_task not in (None, os.environ.get("MODAL_TASK_ID"))
        best = pick_device(None)
        if self._engine.device.type != best:
            self._engine.to(best)
            self._engine.warm_up()
        elif self._restored and self._engine.options.generation == "fast":
            # CUDA graphs captured before a GPU memory snapshot are not relied on after it.
            self._engine.reset_generation_state()
            self._engine.warm_up()
        self._container_id = container_id()
        restore_work = time.perf_counter() - started
        self._model_load_seconds = (
            restore_work if self._restored else self._load_seconds + restore_work
        )
        self._calls = itertools.count()  # next() is atomic: inputs run on concurrent threads

    @modal.method()
    def clone(
        self,
        text: str,
        reference_audio: bytes,
        reference_text: str | None = None,
        language: str = "Auto",
        output_format: str = "WAV",
        generation: dict[str, Any] | None = None,
        request_id: str | None = None,
    ) -> ServiceResult:
        """Speak `text` in the voice of `reference_audio` (bytes of any common audio format).

        `reference_text` (its transcript) selects in-context cloning; without it only the
        speaker embedding is used. `generation`: temperature, top_k, top_p,
        repetition_penalty, max_new_tokens (per chunk), seed. `request_id` only labels the log
        line. Raises `modal_app.errors.InvalidInput` or `GenerationFailed`.
        """
        facts = self._begin_call()
        voice = self._voice(reference_audio, reference_text, output_format, generation)
        output = self._engine.clone(CloneInput(text=text, language=language, **voice))
        self._log_call("clone", request_id, facts, output.inference_seconds, output.chunks)
        return ServiceResult.of(output, facts)

    @modal.method()
    def health(self) -> dict[str, Any]:
        return {
            "status": "healthy",
            "size": PROFILE.size,
            **asdict(self._engine.describe()),
            "container_id": self._container_id,
            "model_load_seconds": self._model_load_seconds,
            "restored_from_snapshot": self._restored,
        }

    def _begin_call(self) -> ContainerFacts:
        """Facts about this container for the caller; the first call it serves is the cold one."""
        return ContainerFacts(
            container_id=self._container_id,
            cold_start=next(self._calls) == 0,
            model_load_seconds=self._model_load_seconds,
            restored_from_snapshot=self._restored,
        )

    @staticmethod
    def _voice(
        reference_audio: bytes,
        reference_text: str | None,
        output_format: str,
        generation: dict[str, Any] | None,
    ) -> dict[str, Any]:
        """The engine request fields every cloning method shares."""
        return {
            "reference_audio": reference_audio,
            "reference_text": reference_text,
            "params": GenerationParams.from_mapping(generation),
            "output_format": output_format,
        }

    @staticmethod
    def _log_call(
        method: str, request_id: str | None, facts: ContainerFacts, seconds: float, chunks: int
    ) -> None:
        """One line per call; never the text."""
        logger.info(
            "%s request_id=%s cold_start=%s chunks=%d inference_seconds=%.2f",
            method,
            request_id,
            facts.cold_start,
            chunks,
            seconds,
        )
