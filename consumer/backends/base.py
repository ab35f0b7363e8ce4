"""The backend seam: what a clone call takes, what it returns, and the interface behind it.

Declarations only: a backend calls its engine; the pipeline owns the request's time (it gives
each call its budget) and reads the audio's format, sample rate and duration from its bytes.
"""

from dataclasses import dataclass, field
from typing import Protocol

# Errors and settings are re-exported so the seam's whole vocabulary imports from here.
from consumer.backends.errors import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    ErrorCode,
    GenerationFailed,
    InvalidInput,
)
from consumer.backends.settings import BackendSettings

# The engine's parameters: checked once, where the request is read, so every backend receives
# values the engine accepts. Bad values raise `InvalidInput`.
from schemas.vocabulary import GenerationParams, ModelSize

__all__ = [
    "Backend",
    "BackendError",
    "BackendSettings",
    "BackendTimeout",
    "BackendUnavailable",
    "CloneJob",
    "CloneResult",
    "ErrorCode",
    "GenerationFailed",
    "GenerationParams",
    "InvalidInput",
]


@dataclass(frozen=True)
class CloneJob:
    """One validated clone request, with its reference audio already fetched."""

    request_id: str
    text: str
    language: str  # engine language name: "Auto", "English", "Chinese", ...
    model: ModelSize  # each backend maps it to a deployment or weights
    reference_audio: bytes = field(repr=False)  # as fetched; any format soundfile reads
    reference_sha256: str
    reference_text: str | None  # None: x-vector-only cloning
    reference_uri: str
    output_format: str  # "WAV" | "FLAC" | "OGG_OPUS" | "MP3": what the worker wants in the end
    generation: GenerationParams = field(default_factory=GenerationParams)


@dataclass(frozen=True)
class CloneResult:
    """Audio from a backend plus what only the backend knows of the call; None where it cannot
    know. What the audio holds (format, sample rate, duration) is read from its bytes."""

    audio: bytes = field(repr=False)  # not always the job's output_format: the worker transcodes
    cold_start: bool | None
    model_load_seconds: float | None
    container_id: str | None
    inference_seconds: float | None
    capped: bool | None = None  # the engine cut a chunk at its frame cap (a runaway generation)


class Backend(Protocol):
    """A voice-cloning engine behind one async call.

    Every failure of `clone` is a `VoicecloneError`; `asyncio.CancelledError` propagates untouched
    once the backend has cleaned up (closed the connection, cancelled the remote call).
    """

    name: str
    timeout_seconds: float  # the configured bound on one call, whatever time the request has

    async def start(self) -> None:
        """Acquire long-lived resources (connection pools, lookups, a local model); no inference.
        A backend that cannot work as configured fails here with `BackendUnavailable`."""

    # The backend takes its budget itself (rather than being wrapped in asyncio.timeout) so it
    # can pass it on (Modal's long poll, httpx) and cancel remote work before reporting.
    async def clone(self, job: CloneJob, timeout: float) -> CloneResult:  # noqa: ASYNC109
        """Clone `job`; give up with `BackendTimeout` after `timeout` seconds (positive: the
        request's time left, already capped by `timeout_seconds`)."""
        ...

    async def ready(self) -> bool:
        """Whether the backend looks reachable now; cheap enough for a readiness probe."""
        ...

    async def close(self) -> None:
        """Release resources; safe to call twice."""
