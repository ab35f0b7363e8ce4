"""Every client of producer/kafka_clients.py is given the settings' security and a client id
naming its use; the worker's get the retry backoff and the reconnect pacing, and its group
member the options the consume loop relies on."""

from collections.abc import Callable
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from producer import kafka_clients
from producer.settings import KafkaSettings

SASL = KafkaSettings(
    bootstrap_servers="broker:9093",
    client_id="svc",
    security_protocol="SASL_PLAINTEXT",
    sasl_mechanism="PLAIN",
    sasl_username="voiceclone",
    sasl_password="secret",
    retry_backoff_ms=777,
)
WORKER: dict[str, Callable[[KafkaSettings], Any]] = {
    "svc-worker": lambda kafka: kafka_clients.worker_consumer(kafka, "group", 60_000, 30.0),
    "svc-cancels": kafka_clients.cancel_consumer,
    "svc-publisher": kafka_clients.outcome_producer,
}
ONE_COMMAND: dict[str, Callable[[KafkaSettings], Any]] = {
    "svc-client": kafka_clients.client_producer,
    "svc-watch": kafka_clients.follower_consumer,
    "svc": kafka_clients.admin_client,
}


def inner(client: Any) -> Any:
    """aiokafka's connection-level client inside a consumer, producer or admin client."""
    return client.client if isinstance(client, AIOKafkaProducer) else client._client


def paced(client: Any) -> bool:
    """Whether `pace_reconnects` wrapped its metadata refresh."""
    return inner(client)._metadata_update.__name__ == "paced_update"


@pytest.mark.parametrize("client_id", [*WORKER, *ONE_COMMAND])
async def test_each_client_has_the_security_options_and_its_own_client_id(client_id: str) -> None:
    build = {**WORKER, **ONE_COMMAND}[client_id]
    connection = inner(build(SASL))

    assert connection._client_id == client_id
    assert connection._bootstrap_servers == "broker:9093"
    assert (connection._security_protocol, connection._sasl_mechanism) == (
        "SASL_PLAINTEXT",
        "PLAIN",
    )
    assert connection._sasl_plain_password == "secret"


async def test_the_workers_clients_back_off_and_the_one_command_clients_do_not() -> None:
    for build in WORKER.values():
        client = build(SASL)
        assert inner(client)._retry_backoff == 0.777
        assert paced(client)
    for build in ONE_COMMAND.values():
        assert not paced(build(SASL))


async def test_the_group_member_reads_committed_from_the_earliest_and_commits_itself() -> None:
    consumer: AIOKafkaConsumer = kafka_clients.worker_consumer(SASL, "group", 60_000, 30.0)

    assert consumer._group_id == "group"
    assert consumer._enable_auto_commit is False
    assert consumer._isolation_level == "read_committed"
    assert consumer._max_poll_interval_ms == 60_000
    # The revocation's 30 s grace plus the margin to commit and rejoin.
    assert consumer._rebalance_timeout_ms == 40_000


async def test_the_outcome_producer_is_idempotent_and_transactional_when_given_an_id() -> None:
    plain = kafka_clients.outcome_producer(SASL)
    transactional = kafka_clients.outcome_producer(SASL, transactional_id="tx-1")

    assert plain._txn_manager is not None  # idempotence
    assert plain._txn_manager.transactional_id is None
    assert transactional._txn_manager.transactional_id == "tx-1"
