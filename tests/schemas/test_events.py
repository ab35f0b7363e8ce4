"""Validation and conventions of the pydantic event models."""

from datetime import UTC, datetime, timedelta, timezone

import pytest
from pydantic import ValidationError

from schemas.events import (
    EVENT_TYPES,
    AudioFormat,
    AudioReady,
    CloneCancel,
    CloneFailed,
    CloneRequest,
    GenerationRecord,
    Language,
    ModelName,
    RequestHeader,
    event_types_by_topic,
    utc_now,
)
from schemas.topics import Topics
from tests.schemas.samples import (
    SAMPLE_IDS,
    SAMPLES,
    full_audio_ready,
    full_request,
    minimal_request,
)


def _request(**changes: object) -> CloneRequest:
    return CloneRequest.model_validate({**minimal_request().model_dump(), **changes})


# Ids a request may carry and be answered under, though the worker serves none of them.
REFUSED_IDS = [".", "..", "a/b", "../x", "a b", "a\n", "é", "x" * 129, "a:b", "a\\b"]
UNSAFE_IDS = ["", *REFUSED_IDS]


def _ready(**changes: object) -> AudioReady:
    return AudioReady.model_validate({**full_audio_ready().model_dump(), **changes})


def _cancel(**changes: object) -> CloneCancel:
    return CloneCancel.model_validate(
        {"request_id": "r", "tenant_id": "t", "requested_at": utc_now(), **changes}
    )


@pytest.mark.parametrize("good", ["a", "req-1", "A.b_c-9", "...", "a..b", ".hidden", "x" * 128])
def test_ids_accept_safe_keys(good: str) -> None:
    assert _request(request_id=good, tenant_id=good).request_id == good
    assert _ready(request_id=good, tenant_id=good).tenant_id == good
    assert _cancel(request_id=good, tenant_id=good).request_id == good


@pytest.mark.parametrize("bad", UNSAFE_IDS)
@pytest.mark.parametrize("field", ["request_id", "tenant_id"])
def test_events_the_worker_writes_from_checked_ids_reject_unsafe_ones(field: str, bad: str) -> None:
    with pytest.raises(ValidationError, match=field):
        _ready(**{field: bad})
    with pytest.raises(ValidationError, match=field):
        _cancel(**{field: bad})


@pytest.mark.parametrize("field", ["request_id", "tenant_id"])
def test_a_request_and_its_header_need_ids(field: str) -> None:
    """An empty id addresses nobody: such a request cannot be answered, so is not valid."""
    with pytest.raises(ValidationError, match=field):
        _request(**{field: ""})
    with pytest.raises(ValidationError, match=field):
        RequestHeader.model_validate({**minimal_request().model_dump(), field: ""})


def test_a_header_is_read_from_an_otherwise_invalid_request() -> None:
    record = full_request().model_dump()
    record["generation"] = {"temperature": float("nan")}
    with pytest.raises(ValidationError, match=r"generation\.temperature"):
        CloneRequest.model_validate(record)
    header = RequestHeader.model_validate(record)
    assert header.model_dump() == {
        field: getattr(full_request(), field) for field in RequestHeader.model_fields
    }


@pytest.mark.parametrize("bad", REFUSED_IDS)
def test_requests_and_their_failures_carry_any_id(bad: str) -> None:
    """The worker, not decoding, refuses a request with an unsafe id: with a clone-failed event
    naming the ids as they were sent."""
    request = _request(request_id=bad, tenant_id=bad)
    failed = CloneFailed(
        request_id=request.request_id,
        tenant_id=request.tenant_id,
        error_code="INVALID_REQUEST",
        message="m",
        retryable=False,
        attempts=1,
        failed_at=utc_now(),
    )
    assert (failed.request_id, failed.tenant_id) == (bad, bad)


def test_text_has_no_length_limit_in_the_contract() -> None:
    assert len(_request(text="x" * 1_000_000).text) == 1_000_000


def test_naive_datetimes_are_rejected() -> None:
    with pytest.raises(ValidationError, match="timezone"):
        _request(created_at=datetime(2025, 1, 1, 12, 0))


def test_datetimes_become_utc_whole_milliseconds() -> None:
    ist = timezone(timedelta(hours=5, minutes=30))
    event = _request(created_at=datetime(2025, 1, 1, 5, 30, 0, 123456, tzinfo=ist))
    assert event.created_at == datetime(2025, 1, 1, 0, 0, 0, 123000, tzinfo=UTC)
    assert event.created_at.tzinfo is UTC
    assert utc_now().microsecond % 1000 == 0


def test_defaults() -> None:
    event = minimal_request()
    assert event.language is Language.AUTO
    assert event.model is ModelName.QWEN3_TTS_12HZ_1_7B_BASE
    assert event.output_format is AudioFormat.WAV
    assert event.generation is None
    assert event.deadline is None
    assert event.metadata == {}
    assert minimal_request().metadata is not event.metadata  # not one shared dict
    assert GenerationRecord().model_dump() == dict.fromkeys(GenerationRecord.model_fields)


def test_model_names_map_to_hub_ids() -> None:
    assert ModelName.QWEN3_TTS_12HZ_1_7B_BASE.hub_id == "Qwen/Qwen3-TTS-12Hz-1.7B-Base"
    assert ModelName.QWEN3_TTS_12HZ_0_6B_BASE.hub_id == "Qwen/Qwen3-TTS-12Hz-0.6B-Base"
    assert ModelName("Qwen/Qwen3-TTS-12Hz-0.6B-Base") is ModelName.QWEN3_TTS_12HZ_0_6B_BASE
    assert (
        _request(model="Qwen/Qwen3-TTS-12Hz-0.6B-Base").model is ModelName.QWEN3_TTS_12HZ_0_6B_BASE
    )
    assert [m.size for m in ModelName] == ["1.7B", "0.6B"]
    with pytest.raises(ValidationError):
        _request(model="Qwen/Qwen3-TTS-12Hz-1.7B-CustomVoice")


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"attempts": 2**31}, "attempts"),
        ({"attempts": -1}, "attempts"),
        ({"error_code": "OOPS"}, "error_code"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_failed_field_checks(changes: dict[str, object], field: str) -> None:
    base = {
        "request_id": "r",
        "tenant_id": "t",
        "error_code": "EXPIRED",
        "message": "m",
        "retryable": False,
        "attempts": 1,
        "failed_at": utc_now(),
    }
    assert CloneFailed.model_validate(base).attempts == 1
    with pytest.raises(ValidationError, match=field):
        CloneFailed.model_validate({**base, **changes})


@pytest.mark.parametrize(
    "generation",
    [{"seed": 2**63}, {"top_k": 2**31}, {"temperature": float("nan")}, {"top_p": float("inf")}],
)
def test_generation_values_must_fit_avro(generation: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        _request(generation=generation)


def test_sha256_must_be_hex() -> None:
    with pytest.raises(ValidationError, match="sha256"):
        _request(
            voice={"voice_id": "v", "reference_audio_uri": "u", "reference_audio_sha256": "abc"}
        )


def test_events_are_frozen() -> None:
    event = full_request()
    with pytest.raises(ValidationError):
        event.text = "changed"  # type: ignore[misc]


@pytest.mark.parametrize(("topic_field", "event"), SAMPLES, ids=SAMPLE_IDS)
def test_avro_dict_round_trip(topic_field: str, event: object) -> None:
    assert isinstance(event, CloneRequest | AudioReady | CloneFailed | CloneCancel)
    assert type(event).from_avro(event.to_avro()) == event
    assert EVENT_TYPES[event.avro_name] is type(event)


def test_topic_routing_is_data() -> None:
    assert event_types_by_topic(Topics()) == {
        "voice.clone.requests": CloneRequest,
        "voice.clone.audio-ready": AudioReady,
        "voice.clone.failed": CloneFailed,
        "voice.clone.cancel": CloneCancel,
        "voice.clone.requests.dlq": CloneRequest,
    }
    renamed = event_types_by_topic(Topics(requests="in", audio_ready="out"))
    assert renamed["in"] is CloneRequest
    assert renamed["out"] is AudioReady


def test_one_topic_cannot_carry_two_event_types() -> None:
    with pytest.raises(ValueError, match="both"):
        event_types_by_topic(Topics(audio_ready="results", failed="results"))
