"""The typed errors the codecs raise. Nothing else escapes encode() or decode()."""

from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from schemas.vocabulary import ErrorCode, VoicecloneError


class DecodeReason(StrEnum):
    """Why a record could not be decoded (a short code for logs, metrics and DLQ headers)."""

    EMPTY = "empty"  # no value (a tombstone) or zero bytes
    TOO_LARGE = "too_large"  # over the codec's max_value_bytes
    BAD_HEADER = "bad_header"  # no C3 01 marker and no schema header, or headers contradict
    BAD_MAGIC = "bad_magic"  # not the Confluent wire format (first byte is not 0)
    UNKNOWN_TOPIC = "unknown_topic"  # the codec was told which topics exist; this is not one
    UNKNOWN_SCHEMA = "unknown_schema"  # fingerprint or schema id nobody knows
    INCOMPATIBLE_SCHEMA = "incompatible_schema"  # writer schema cannot be read as ours
    WRONG_TYPE = "wrong_type"  # a valid event, but not of the type this topic carries
    CORRUPT = "corrupt"  # bytes do not parse with the writer schema
    INVALID_RECORD = "invalid_record"  # parses, but the event fails validation
    REGISTRY_UNAVAILABLE = "registry_unavailable"  # transient: retry, don't dead-letter


class EncodeReason(StrEnum):
    """Why an event could not be encoded."""

    UNKNOWN_TOPIC = "unknown_topic"
    WRONG_TOPIC = "wrong_topic"  # the topic carries another event type
    INVALID_EVENT = "invalid_event"  # e.g. built with model_construct, bypassing validation
    UNKNOWN_SCHEMA = "unknown_schema"  # registry lookup found nothing (auto_register off)
    SCHEMA_REJECTED = "schema_rejected"  # registry refused the schema (e.g. incompatible)
    REGISTRY_UNAVAILABLE = "registry_unavailable"


# The reasons that are an outage: the same bytes may decode (or the event encode) later.
_TRANSIENT = frozenset({DecodeReason.REGISTRY_UNAVAILABLE, EncodeReason.REGISTRY_UNAVAILABLE})


class EventCodecError(VoicecloneError):
    """Base of both codec errors: `reason` is a short machine code, str(error) is for people;
    `transient` when the reason is an outage."""

    def __init__(self, reason: str, message: str, *, topic: str | None = None) -> None:
        super().__init__(message, transient=reason in _TRANSIENT)
        self.reason = reason
        self.topic = topic

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({str(self.reason)!r}, {self.message!r}, topic={self.topic!r})"
        )


class EventDecodeError(EventCodecError):
    """A record's bytes are not a valid event for its topic. Reasons: DecodeReason. A request
    that is read but invalid is answered with its code, INVALID_REQUEST.

    On INVALID_RECORD, `event_type` and `record` say what was read (the Avro record as fastavro
    returns it), so that a reader may still act on its valid parts: the worker answers a request
    whose ids are readable rather than dead-lettering it. None for every other reason.
    """

    code = ErrorCode.INVALID_REQUEST

    def __init__(
        self,
        reason: str,
        message: str,
        *,
        topic: str | None = None,
        event_type: type | None = None,
        record: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(reason, message, topic=topic)
        self.event_type = event_type
        self.record = record


class EventEncodeError(EventCodecError):
    """An event could not be serialized for a topic. Reasons: EncodeReason."""


class InvalidSchemaError(ValueError):
    """A schema given to the SchemaStore is not an Avro record schema we can use."""
