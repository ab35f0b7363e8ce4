"""What goes into and comes out of the engine, and what the Modal service returns to the worker:
plain data, no torch, so callers (the Modal service, the HTTP layer, the worker's backends) can
build requests and read results without the model."""

from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

import numpy as np

from modal_app.audio import DecodedAudio
from schemas.vocabulary import AudioFormat, GenerationParams

GENERATION_MODES = ("stock", "fast")


@dataclass(frozen=True)
class EngineOptions:
    """Serving limits and tuning. The defaults suit the real 0.6B/1.7B models on one GPU."""

    chunk_chars: int = 200  # long texts are split into chunks of at most this many characters
    max_chunks_per_batch: int = 16  # chunks generated together in one call
    crossfade_seconds: float = 0.03
    max_text_chars: int = 50_000  # the seed's limit
    max_batch_texts: int = 64
    min_reference_seconds: float = 0.5
    max_reference_seconds: float = 60.0
    prompt_cache_size: int = 32  # voices; 0 disables the cache
    # "stock": qwen-tts's generation loop, one call at a time; "fast": modal_app.fastgen, which
    # batches the chunks of all concurrent calls in one loop (static caches, CUDA graphs)
    generation: str = "stock"
    # The fast loop's workspace, allocated at load: rows generated at once (more wait), and
    # talker positions per row (prompt plus frames; 2048 is 2 min 40 s of audio after a prompt).
    max_batch_rows: int = 16
    max_positions: int = 2048
    # A row's frame cap: this many 12.5 Hz frames per token of its text (speech takes about 4),
    # at least `min_frame_cap`; a row that never says its end token stops there.
    frames_per_text_token: float = 12.0
    min_frame_cap: int = 25
    compile_steps: bool = False  # torch.compile the fast loop's steps (CUDA only; experimental)
    # Decode with the speech decoder traced as one graph that runs without the GIL, once it is
    # checked equal to the eager decoder (modal_app.decoder_graph); False: always eager.
    trace_decoder: bool = True

    def __post_init__(self) -> None:
        if self.generation not in GENERATION_MODES:
            raise ValueError(
                f"generation must be one of {', '.join(GENERATION_MODES)}, not {self.generation!r}"
            )


@dataclass(frozen=True, kw_only=True)
class VoiceRequest:
    """What every request carries: the voice to clone and how to render the result."""

    reference_audio: bytes | DecodedAudio  # bytes in any format libsndfile reads
    reference_text: str | None = None  # transcript of the reference; None: x-vector-only mode
    params: GenerationParams = field(default_factory=GenerationParams)
    output_format: AudioFormat | str = AudioFormat.WAV


@dataclass(frozen=True, kw_only=True)
class CloneInput(VoiceRequest):
    text: str
    language: str = "Auto"


@dataclass(frozen=True, kw_only=True)
class BatchCloneInput(VoiceRequest):
    """Many texts in one voice; `languages` is one name for all or one per text."""

    texts: Sequence[str]
    languages: Sequence[str] | str = "Auto"


@dataclass(frozen=True)
class CloneOutput:
    audio: bytes
    audio_format: AudioFormat
    sample_rate: int
    duration_seconds: float
    inference_seconds: float  # prompt + generation for the whole call (shared by a batch)
    prompt_cache_hit: bool
    chunks: int
    waveform: np.ndarray = field(repr=False)  # float32 mono, before encoding
    # A chunk ran to its frame cap (the model never said its end token): the audio ends there.
    capped: bool = False

    @property
    def content_type(self) -> str:
        return self.audio_format.content_type


@dataclass(frozen=True)
class BatchCloneOutput:
    items: list[CloneOutput]
    inference_seconds: float
    prompt_cache_hit: bool


@dataclass(frozen=True)
class EngineInfo:
    model: str
    device: str
    dtype: str
    attention_implementation: str
    gpu: str | None
    languages: list[str]


@dataclass(frozen=True)
class ContainerFacts:
    """The Modal container that served a call, as the worker's metrics and logs report it."""

    container_id: str
    cold_start: bool  # the first call this container served
    model_load_seconds: float  # loading (or restoring) the model before it could serve
    restored_from_snapshot: bool


@dataclass(frozen=True, kw_only=True)
class ServiceResult:
    """What the Modal service's `clone` returns to the worker: one text's audio, and facts.

    Modal pickles it by reference to this module, which the service's image ships
    (`add_local_python_source("modal_app")`) and the worker installs, so both sides must know
    the class: roll workers out before the service (docs/gpu-service.md). A field added later
    needs a default: unpickling an older service's result leaves it out, and the class's
    default is read instead.
    """

    audio: bytes
    format: str  # an AudioFormat value
    content_type: str
    sample_rate: int
    duration_seconds: float
    chunks: int
    prompt_cache_hit: bool
    inference_seconds: float  # prompt + generation for the whole call
    container: ContainerFacts
    # A chunk was cut at its frame cap (a runaway generation); None from a service deployed
    # before it said.
    capped: bool | None = None

    @classmethod
    def of(cls, output: CloneOutput, container: ContainerFacts) -> "ServiceResult":
        return cls(
            audio=output.audio,
            format=output.audio_format.value,
            content_type=output.content_type,
            sample_rate=output.sample_rate,
            duration_seconds=output.duration_seconds,
            chunks=output.chunks,
            prompt_cache_hit=output.prompt_cache_hit,
            inference_seconds=output.inference_seconds,
            container=container,
            capped=output.capped,
        )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ServiceResult":
        """The flat dict a service deployed before this class returns instead (the same names,
        the container's among them), read during a rollout. KeyError when one is missing."""
        container = ContainerFacts(**_named(values, ContainerFacts))
        return cls(container=container, **_named(values, cls, skip="container"))


def _named(values: Mapping[str, Any], cls: type, skip: str = "") -> dict[str, Any]:
    """`values` of `cls`'s fields but `skip`; a field with a default (one added later) may be
    absent."""
    return {
        item.name: values[item.name]
        for item in fields(cls)
        if item.name != skip and (item.name in values or item.default is MISSING)
    }
