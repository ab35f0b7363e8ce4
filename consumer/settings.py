"""The worker's settings: one object, read from `VOICECLONE_*` environment variables at start."""

from pydantic import BaseModel, Field

from consumer.backends.base import BackendSettings
from consumer.observability.settings import HttpServerSettings
from consumer.reference import ReferenceSettings
from producer.settings import ClientSettings


class LimitSettings(BaseModel):
    """Bounds on what one request may ask for."""

    max_text_chars: int = Field(
        20_000, ge=1, description="Longest text accepted; longer gets TEXT_TOO_LONG."
    )


class WorkerSettings(ClientSettings):
    """Everything `voiceclone worker` reads."""

    group_id: str = Field("voiceclone-worker", description="Kafka consumer group of the workers.")
    max_in_flight: int = Field(
        16, ge=1, description="Requests processed at once by one worker; fetching pauses when full."
    )
    poll_timeout_ms: int = Field(
        200, ge=1, description="Longest wait for new records in one poll of the requests topic."
    )
    max_poll_interval_ms: int = Field(
        300_000,
        ge=1000,
        description="Kafka max.poll.interval.ms; the loop polls even when full, so long jobs "
        "never exceed it.",
    )
    shutdown_grace_seconds: float = Field(
        30, ge=0, description="On SIGTERM, how long in-flight requests may run before cancelling."
    )
    revoke_grace_seconds: float = Field(
        10, ge=0, description="On partition revocation, how long their in-flight requests may run."
    )
    cancel_lookback_seconds: float = Field(
        3600, ge=0, description="How far back the cancel topic is read when the worker starts."
    )
    limits: LimitSettings = LimitSettings()
    backend: BackendSettings = BackendSettings()
    reference: ReferenceSettings = ReferenceSettings()
    http: HttpServerSettings = HttpServerSettings()
