"""The worker's settings: one object, read from `VOICECLONE_*` environment variables at start."""

from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, Field

from consumer.backends.base import BackendSettings
from consumer.observability.settings import HttpServerSettings
from consumer.reference import ReferenceSettings
from producer.caseless import CaseInsensitive
from producer.retry import RetryPolicy
from producer.settings import ClientSettings


class LimitSettings(BaseModel):
    """Bounds on what one request may ask for, and on what one tenant may hold."""

    max_text_chars: int = Field(
        default=20_000, ge=1, description="Longest text accepted; longer gets TEXT_TOO_LONG."
    )
    max_audio_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=1,
        description="Largest generated audio accepted, as the backend sent it and decoded "
        "(32-bit samples per channel: 256 MiB is 46 minutes at 24 kHz); larger gets "
        "INFERENCE_FAILED before it is transcoded or stored.",
    )
    max_in_flight_per_tenant: int | None = Field(
        default=None,
        ge=1,
        description="Requests of one tenant processed at once by one worker; the tenant's "
        "further requests wait (see max_waiting) while other tenants' go ahead. Unset: no "
        "per-tenant bound.",
    )


class RetrySettings(BaseModel):
    """Retries of a pipeline stage (reference fetch, backend call, storage) that failed with a
    transient error; each stage is retried on its own, within the request's deadline."""

    max_attempts: int = Field(
        default=3,
        ge=1,
        description="Tries of one stage (reference fetch, backend call, storage) failing with "
        "a transient error before the request fails; 1: no retries.",
    )
    max_seconds: float = Field(
        default=300, ge=0, description="No new try of a stage starts this long after its first one."
    )
    initial_backoff_seconds: float = Field(
        default=1.0, ge=0, description="Wait before the second try; doubled for each later one."
    )
    max_backoff_seconds: float = Field(
        default=30.0,
        ge=0,
        description="Longest wait between tries (each wait is jittered to 50-100 %).",
    )

    def policy(self) -> RetryPolicy:
        return RetryPolicy(
            max_attempts=self.max_attempts,
            max_seconds=self.max_seconds,
            initial_backoff_seconds=self.initial_backoff_seconds,
            max_backoff_seconds=self.max_backoff_seconds,
        )


class ProcessingGuarantee(StrEnum):
    """What a subscriber of the outcome topics may rely on (docs/reliability.md)."""

    AT_LEAST_ONCE = "at_least_once"
    EXACTLY_ONCE = "exactly_once"


class WorkerSettings(ClientSettings):
    """Everything `voiceclone worker` reads."""

    group_id: str = Field(
        default="voiceclone-worker", description="Kafka consumer group of the workers."
    )
    max_in_flight: int = Field(
        default=16,
        ge=1,
        description="Requests processed at once by one worker; fetching pauses when full. "
        "Requests waiting for their tenant's turn do not count (see max_waiting).",
    )
    max_waiting: int = Field(
        default=64,
        ge=0,
        description="Requests held in memory, uncommitted, while their tenant is at "
        "limits.max_in_flight_per_tenant; when this many wait, fetching pauses for all tenants.",
    )
    poll_timeout_ms: int = Field(
        default=200,
        ge=1,
        description="Longest wait for new records in one poll of the requests topic.",
    )
    max_poll_interval_ms: int = Field(
        default=300_000,
        ge=1000,
        description="Kafka max.poll.interval.ms; the loop polls even when full, so long jobs "
        "never exceed it.",
    )
    shutdown_grace_seconds: float = Field(
        default=30,
        ge=0,
        description="On SIGTERM, how long in-flight requests may run before cancelling.",
    )
    revoke_grace_seconds: float = Field(
        default=10,
        ge=0,
        description="On partition revocation, how long their in-flight requests may run.",
    )
    commit_interval_seconds: float = Field(
        default=0.2,
        ge=0,
        description="The consume loop commits finished offsets at most this often (drain and "
        "revocation commit at once): a commit per poll costs a broker round trip per handful "
        "of records, and a crash redelivers at most this much more finished work.",
    )
    broker_timeout_seconds: float = Field(
        default=10,
        gt=0,
        description="An outcome or dead letter the broker has not acknowledged, or an offset "
        "commit it has not answered (`at_least_once`), within this long counts as failed (a "
        "`publish` retry, a commit failure) and fails `/readyz`'s `kafka` check until Kafka "
        "answers again. The outcome is still waited for, never sent twice; the commit is tried "
        "again at the next one.",
    )
    cancel_lookback_seconds: float = Field(
        default=3600,
        ge=0,
        description="How far back the cancel topic is read when the worker starts.",
    )
    processing_guarantee: Annotated[ProcessingGuarantee, CaseInsensitive()] = Field(
        default=ProcessingGuarantee.AT_LEAST_ONCE,
        description="`at_least_once`: each outcome is published as soon as it is ready and may be "
        "published again after a crash. `exactly_once`: outcomes and the requests' offsets are "
        "committed in one Kafka transaction (about every 200 ms), so `read_committed` "
        "subscribers see each outcome once.",
    )
    transactional_id_prefix: str | None = Field(
        default=None,
        description="`exactly_once` only: the start of the transactional ids, the same for every "
        "worker of the group. Each worker holds one transactional producer per requests "
        "partition assigned to it, with the id `<prefix>-<topic>-<partition>`, so a partition's "
        "new owner fences its old one. Unset: `<group_id>`.",
    )
    transactional_id: str | None = Field(
        default=None,
        description="Ignored, with a warning at start: earlier releases gave each worker a "
        "transactional id of its own; `transactional_id_prefix`, the same on every worker, "
        "replaces it (a per-pod value must not become the prefix, or no worker fences another).",
    )
    tracing_enabled: bool = Field(
        default=False,
        description="OpenTelemetry spans per request and stage, through the global tracer "
        "provider (see Metrics and alerts: Tracing). Off: trace headers are only passed on.",
    )
    limits: LimitSettings = LimitSettings()
    retry: RetrySettings = RetrySettings()
    backend: BackendSettings = BackendSettings()
    reference: ReferenceSettings = ReferenceSettings()
    http: HttpServerSettings = HttpServerSettings()

    def effective_transactional_id_prefix(self) -> str:
        """The start of `exactly_once`'s transactional ids: set, or the group's id."""
        return self.transactional_id_prefix or self.group_id
