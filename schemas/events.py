"""Pydantic models of the events.

The .avsc files in schemas/avro/ are the contract other teams read; these models mirror them
exactly (tests/schemas/test_agreement.py proves it) and add the checks Avro cannot express.
Field documentation lives in the .avsc files only, so it cannot drift.

Conventions that keep the Avro mapping trivial:
- the enums are the vocabulary's (`schemas.vocabulary`): a member's value is its Avro symbol;
- timestamps are UTC-aware datetimes cut to whole milliseconds (Avro timestamp-millis), so an
  event survives an encode/decode round trip unchanged;
- models are frozen and reject unknown fields.
"""

from collections.abc import Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Annotated, Any, ClassVar, Final, Self

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints

from schemas.topics import Topics
from schemas.vocabulary import (
    DEFAULT_MODEL,
    AudioFormat,
    ErrorCode,
    GenerationParams,
    Language,
    ModelName,
)

AVRO_NAMESPACE: Final = "io.voiceclone.events"

# Ids end up in object keys and paths, hence the character set and the ban on dot segments.
# Events the worker writes from a served request (AudioReady) and cancels carry such ids; a
# CloneRequest may carry any non-empty string, so that one with an unsafe id is answered (the
# worker refuses it with INVALID_REQUEST before building any key) rather than dead-lettered, and
# its CloneFailed carries the ids back as they were. An empty id addresses nobody: such a
# request cannot be answered (see RequestHeader).
SAFE_ID_PATTERN: Final = r"^[A-Za-z0-9._-]{1,128}$"
_DOT_SEGMENTS: Final = frozenset({".", ".."})

INT32_MIN: Final = -(2**31)
INT32_MAX: Final = 2**31 - 1
INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1


def _not_dot_segment(value: str) -> str:
    if value in _DOT_SEGMENTS:
        raise ValueError("must not be '.' or '..'")
    return value


def _utc_millis(value: datetime) -> datetime:
    value = value.astimezone(UTC)
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


SafeId = Annotated[
    str, StringConstraints(pattern=SAFE_ID_PATTERN), AfterValidator(_not_dot_segment)
]
NonEmptyStr = Annotated[str, StringConstraints(min_length=1)]
# The ids a request is answered under: any text but "" (an answer to "" would reach nobody).
AnswerId = NonEmptyStr
Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F]{64}$")]
# Avro int/long are 32/64-bit: out-of-range numbers must fail here, not in the encoder.
Int32 = Annotated[int, Field(ge=INT32_MIN, le=INT32_MAX)]
Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
Count32 = Annotated[int, Field(ge=0, le=INT32_MAX)]
Count64 = Annotated[int, Field(ge=0, le=INT64_MAX)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
UtcDatetime = Annotated[AwareDatetime, AfterValidator(_utc_millis)]
StrMap = dict[str, str]


def utc_now() -> datetime:
    """The current time as the events carry it (UTC, whole milliseconds)."""
    return _utc_millis(datetime.now(UTC))


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class EventModel(_Record):
    """Base of the top-level events: each is one Avro record in schemas/avro/."""

    avro_name: ClassVar[str]

    def to_avro(self) -> dict[str, Any]:
        """The record as fastavro writes it (enum members are their symbols)."""
        # Valid models serialize cleanly; on a model_construct-ed one, warnings would only
        # precede the validation error the codec raises anyway.
        return self.model_dump(warnings=False)

    @classmethod
    def from_avro(cls, record: Mapping[str, Any]) -> Self:
        """Validate a record as fastavro reads it; raises pydantic.ValidationError."""
        return cls.model_validate(record)


class VoiceReference(_Record):
    voice_id: NonEmptyStr
    reference_audio_uri: NonEmptyStr
    reference_text: str | None = None
    reference_audio_sha256: Sha256Hex | None = None


class GenerationRecord(_Record):
    """The request's generation parameters as the wire carries them: what Avro can state
    (finite numbers, int and long ranges). The engine's rules are checked by `params()`."""

    model_config = ConfigDict(title="GenerationParams")  # the Avro record's name

    temperature: FiniteFloat | None = None
    top_k: Int32 | None = None
    top_p: FiniteFloat | None = None
    repetition_penalty: FiniteFloat | None = None
    max_new_tokens: Int32 | None = None
    seed: Int64 | None = None

    def params(self) -> GenerationParams:
        """The parameters the engine takes; InvalidInput if one breaks its rule."""
        return GenerationParams.from_mapping(self.model_dump())


class CloneRequest(EventModel):
    avro_name: ClassVar[str] = f"{AVRO_NAMESPACE}.CloneRequest"

    request_id: AnswerId  # checked by the worker, see SAFE_ID_PATTERN
    tenant_id: AnswerId
    voice: VoiceReference
    text: str
    language: Language = Language.AUTO
    model: ModelName = DEFAULT_MODEL
    output_format: AudioFormat = AudioFormat.WAV
    generation: GenerationRecord | None = None
    deadline: UtcDatetime | None = None
    created_at: UtcDatetime
    metadata: StrMap = {}  # pydantic copies it per instance


class RequestHeader(_Record):
    """What of a CloneRequest its answer and the worker's metrics need: the ids and metadata the
    answer carries, the model and creation time its metrics are labelled and timed by.

    Read on its own from a request that fails validation elsewhere (say a NaN temperature), so
    that the request is answered with a clone-failed event instead of dead-lettered. Its fields
    share CloneRequest's types: each rule stays in one place, and whatever fails here fails the
    whole request too.
    """

    model_config = ConfigDict(extra="ignore")  # the rest of the request is not read here

    request_id: AnswerId
    tenant_id: AnswerId
    model: ModelName = DEFAULT_MODEL
    created_at: UtcDatetime
    metadata: StrMap = {}  # pydantic copies it per instance


class AudioTimings(_Record):
    queue_ms: Count64
    reference_fetch_ms: Count64
    inference_ms: Count64
    encode_ms: Count64
    upload_ms: Count64
    total_ms: Count64


class AudioReady(EventModel):
    avro_name: ClassVar[str] = f"{AVRO_NAMESPACE}.AudioReady"

    request_id: SafeId
    tenant_id: SafeId
    voice_id: NonEmptyStr
    audio_url: NonEmptyStr
    storage_uri: NonEmptyStr
    content_type: NonEmptyStr
    format: AudioFormat
    sample_rate: Count32
    duration_ms: Count64
    size_bytes: Count64
    sha256: Sha256Hex
    model: ModelName
    backend: str
    language: Language
    cold_start: bool
    timings: AudioTimings
    url_expires_at: UtcDatetime | None = None
    completed_at: UtcDatetime
    metadata: StrMap = {}  # pydantic copies it per instance


class CloneFailed(EventModel):
    avro_name: ClassVar[str] = f"{AVRO_NAMESPACE}.CloneFailed"

    request_id: str  # the request's, as it was: possibly not a SafeId
    tenant_id: str
    error_code: ErrorCode
    message: str
    retryable: bool
    attempts: Count32
    failed_at: UtcDatetime
    metadata: StrMap = {}  # pydantic copies it per instance


class CloneCancel(EventModel):
    avro_name: ClassVar[str] = f"{AVRO_NAMESPACE}.CloneCancel"

    request_id: SafeId
    tenant_id: SafeId
    requested_at: UtcDatetime
    metadata: StrMap = {}  # pydantic copies it per instance


Event = CloneRequest | AudioReady | CloneFailed | CloneCancel

# Every event type, by Avro full name (what the event-type header and writer schemas name).
EVENT_TYPES: Final[Mapping[str, type[Event]]] = MappingProxyType(
    {cls.avro_name: cls for cls in (CloneRequest, AudioReady, CloneFailed, CloneCancel)}
)

# Which event type each topic carries, keyed by the Topics field naming the topic. The DLQ
# holds requests the worker gave up on, byte for byte, so it decodes as CloneRequest.
TOPIC_EVENT_TYPES: Final[Mapping[str, type[Event]]] = MappingProxyType(
    {
        "requests": CloneRequest,
        "audio_ready": AudioReady,
        "failed": CloneFailed,
        "cancel": CloneCancel,
        "dlq": CloneRequest,
    }
)


def event_types_by_topic(topics: Topics) -> dict[str, type[Event]]:
    """Map each configured topic name to the one event type it carries."""
    routes: dict[str, type[Event]] = {}
    for field, event_type in TOPIC_EVENT_TYPES.items():
        name = getattr(topics, field)
        if routes.setdefault(name, event_type) is not event_type:
            raise ValueError(
                f"topic {name!r} would carry both {routes[name].__name__} and "
                f"{event_type.__name__}; give them separate topics"
            )
    return routes
