"""Every aiokafka client the product opens, built from `KafkaSettings` in one place.

Each use has its own small function, named for it; all share the bootstrap servers, the
security options (`KafkaSettings.client_options`) and a client id `<client_id>-<use>` (the admin
client's is `client_id` itself). The clients of the long-running worker also get aiokafka's
retry backoff and paced metadata refreshes (`producer.reconnects`), so an outage is waited out
without a busy loop; the CLI's and the client library's, which live for one command, do not.

Callers own what they get: they start it, and stop (or close) it.
"""

from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from producer.reconnects import pace_reconnects
from producer.settings import KafkaSettings

# aiokafka's default: how long a silent member stays in its group.
SESSION_TIMEOUT_MS = 10_000
# Time a rebalance allows beyond the revoke grace: committing and sending the rejoin request.
_REJOIN_MARGIN_MS = 10_000
# aiokafka's default bound on one record, plus room for the dlq.* headers: a dead letter copies
# a request record, which may itself be as large as an upstream producer's default allows.
# The DLQ topic must allow it too (max.message.bytes; `voiceclone topics create` sets it).
MAX_RECORD_BYTES = 1024 * 1024 + 64 * 1024


def worker_consumer(
    kafka: KafkaSettings,
    group_id: str,
    max_poll_interval_ms: int,
    revoke_grace_seconds: float,
) -> AIOKafkaConsumer:
    """The worker's member of its consumer group: it commits itself, reads only committed
    transactions, and starts a partition without a committed offset at its beginning."""
    consumer = AIOKafkaConsumer(
        **_options(kafka, "worker"),
        **kafka.backoff_options(),
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        max_poll_interval_ms=max_poll_interval_ms,
        session_timeout_ms=SESSION_TIMEOUT_MS,
        # The revocation callback waits up to the revoke grace for in-flight work; the group
        # must wait that long for us to rejoin, or it would evict us before we commit.
        rebalance_timeout_ms=max(
            SESSION_TIMEOUT_MS, round(revoke_grace_seconds * 1000) + _REJOIN_MARGIN_MS
        ),
    )
    pace_reconnects(consumer, kafka)
    return consumer


def cancel_consumer(kafka: KafkaSettings) -> AIOKafkaConsumer:
    """The worker's reader of the cancel topic: no group, every worker reads every cancel."""
    consumer = AIOKafkaConsumer(
        **_options(kafka, "cancels"),
        **kafka.backoff_options(),
        group_id=None,
        enable_auto_commit=False,
    )
    pace_reconnects(consumer, kafka)
    return consumer


def outcome_producer(kafka: KafkaSettings, transactional_id: str | None = None) -> AIOKafkaProducer:
    """The worker's producer of outcomes and dead letters: idempotent, acks=all; with
    `transactional_id`, the transactional producer of `exactly_once`."""
    producer = AIOKafkaProducer(
        **_options(kafka, "publisher"),
        **kafka.backoff_options(),
        transactional_id=transactional_id,  # None: not transactional
        acks="all",
        enable_idempotence=True,
        # Send at once: `publish` awaits the ack, so a linger adds to every request; sends made
        # while a request is in flight still batch (bench latency p50 5.6 ms, 6.3-7.9 at 2).
        linger_ms=0,
        max_request_size=MAX_RECORD_BYTES,
    )
    pace_reconnects(producer, kafka)
    return producer


def client_producer(kafka: KafkaSettings) -> AIOKafkaProducer:
    """The client library's producer of requests and cancels: idempotent, acks=all, so a
    retry after a lost acknowledgement writes no second copy."""
    return AIOKafkaProducer(**_options(kafka, "client"), acks="all", enable_idempotence=True)


def follower_consumer(kafka: KafkaSettings) -> AIOKafkaConsumer:
    """The client library's reader of the outcome topics (`voiceclone watch`, `wait`): no
    group, positioned by the caller; outcomes of aborted transactions are never seen."""
    return AIOKafkaConsumer(
        **_options(kafka, "watch"),
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
    )


def admin_client(kafka: KafkaSettings) -> AIOKafkaAdminClient:
    """For topic administration (`voiceclone topics create`)."""
    return AIOKafkaAdminClient(
        bootstrap_servers=kafka.bootstrap_servers,
        client_id=kafka.client_id,
        **kafka.client_options(),
    )


def _options(kafka: KafkaSettings, use: str) -> dict[str, Any]:
    """What every producer and consumer is given: where the cluster is, how to prove who we
    are, and a client id naming the use (brokers log and quote it)."""
    return {
        "bootstrap_servers": kafka.bootstrap_servers,
        "client_id": f"{kafka.client_id}-{use}",
        **kafka.client_options(),
    }
