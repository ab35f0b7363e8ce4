"""Settings read from the environment: names chosen from a list, in any case."""

import os
from typing import cast

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from pydantic import ValidationError
from structlog.testing import capture_logs

from consumer.app import _ClientsFromSettings, _guarantee
from consumer.settings import ProcessingGuarantee, WorkerSettings
from producer.publisher import PublisherHooks
from producer.settings import LogFormat, LogLevel, SaslMechanism, SecurityProtocol
from producer.transactions import TransactionalPublisher
from tests.fixtures.memory_kafka import MemoryKafka

PREFIX = "VOICECLONE_"


@pytest.fixture(autouse=True)
def bare_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the variables a test sets."""
    for name in [name for name in os.environ if name.startswith(PREFIX)]:
        monkeypatch.delenv(name)


def test_every_setting_with_a_list_of_choices_reads_them_in_any_case(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in {
        "LOG_LEVEL": "WARNING",
        "LOG_FORMAT": "Console",
        "KAFKA__SECURITY_PROTOCOL": "sasl_plaintext",
        "KAFKA__SASL_MECHANISM": "scram-sha-512",
        "KAFKA__SASL_USERNAME": "user",
        "KAFKA__SASL_PASSWORD": "secret",
        "PROCESSING_GUARANTEE": "EXACTLY_ONCE",
        "STORAGE__KIND": "LOCAL",
        "STORAGE__ADDRESSING_STYLE": "Path",
        "BACKEND__KIND": "HTTP",
        "BACKEND__LOCAL__GENERATION": "Fast",
    }.items():
        monkeypatch.setenv(PREFIX + name, value)

    settings = WorkerSettings()

    assert (settings.log_level, settings.log_format) == (LogLevel.WARNING, LogFormat.CONSOLE)
    assert settings.kafka.security_protocol is SecurityProtocol.SASL_PLAINTEXT
    assert settings.kafka.sasl_mechanism is SaslMechanism.SCRAM_SHA_512
    assert settings.processing_guarantee is ProcessingGuarantee.EXACTLY_ONCE
    assert (settings.storage.kind, settings.storage.addressing_style) == ("local", "path")
    assert (settings.backend.kind, settings.backend.local.generation) == ("http", "fast")


def test_a_name_not_in_the_list_is_still_refused_naming_the_choices(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(PREFIX + "BACKEND__KIND", "htp")

    with pytest.raises(ValidationError, match="Input should be 'modal', 'http' or 'local'"):
        WorkerSettings()


def test_the_old_per_worker_transactional_id_is_ignored_out_loud(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A per-pod id taken as the group's prefix would let no worker fence another.
    monkeypatch.setenv("VOICECLONE_PROCESSING_GUARANTEE", "exactly_once")
    monkeypatch.setenv("VOICECLONE_TRANSACTIONAL_ID", "worker-0")
    settings = WorkerSettings()
    with capture_logs() as logs:
        _guarantee(
            settings, settings.make_codec(), PublisherHooks(), _ClientsFromSettings(settings)
        )
    assert settings.effective_transactional_id_prefix() == settings.group_id
    (warning,) = [e for e in logs if e["event"] == "setting_ignored"]
    assert warning["setting"] == "transactional_id"
    assert warning["log_level"] == "warning"


async def test_exactly_once_makes_its_partitions_producers_through_the_clients_it_is_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VOICECLONE_PROCESSING_GUARANTEE", "exactly_once")
    settings = WorkerSettings()
    asked: list[str | None] = []

    class Clients(_ClientsFromSettings):
        def outcome_producer(self, transactional_id: str | None = None) -> AIOKafkaProducer:
            asked.append(transactional_id)
            return cast(AIOKafkaProducer, MemoryKafka().producer())

    publisher, _ = _guarantee(settings, settings.make_codec(), PublisherHooks(), Clients(settings))
    assert isinstance(publisher, TransactionalPublisher)
    await publisher.open([TopicPartition(settings.topics.requests, 0)])
    await publisher.stop()

    assert asked == [f"{settings.group_id}-{settings.topics.requests}-0"]
