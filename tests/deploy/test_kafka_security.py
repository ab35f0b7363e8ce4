"""Kafka over TLS with SASL: the settings, every client built from them against a real SASL_SSL
listener (`secure_kafka`, the session's second broker), and the one-line errors that a wrong
password or TLS setup gets. The password must never show in a repr, an error or a log.
"""

import asyncio
import logging
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from aiokafka.errors import KafkaConnectionError
from pydantic import ValidationError

from consumer.backends import BackendSettings
from consumer.reference import ReferenceSettings
from consumer.settings import WorkerSettings
from producer.admin import create_topics
from producer.client import VoiceCloneClient
from producer.kafka_security import explain_connection_failure
from producer.settings import ClientSettings, KafkaSettings
from producer.storage import StorageSettings
from schemas.events import CloneFailed, ErrorCode
from schemas.topics import Topics
from tests.fixtures.kafka import SecureBroker, run_broker_cli
from tests.fixtures.worker import running_worker

pytestmark = pytest.mark.timeout(180)

SECRET = "pw-never-shown-7f3a9c"
WRONG_PASSWORD = "wrong-password-0c1d2e"
ENV = "VOICECLONE_KAFKA__"
CLI_TIMEOUT_S = 120.0


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "kafka-password"
    path.write_text(f"{SECRET}\n")
    return path


def sasl(protocol: str = "SASL_SSL", **fields: Any) -> dict[str, Any]:
    return {
        "security_protocol": protocol,
        "sasl_mechanism": "SCRAM-SHA-256",
        "sasl_username": "voiceclone",
        "sasl_password": SECRET,
    } | fields


# --- settings ----------------------------------------------------------------------------------


def test_plaintext_by_default_adds_nothing_but_the_protocol() -> None:
    assert KafkaSettings().client_options() == {"security_protocol": "PLAINTEXT"}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            sasl(sasl_mechanism=None),
            "security_protocol SASL_SSL needs sasl_mechanism and sasl_username",
        ),
        (
            sasl(sasl_username=None),
            "security_protocol SASL_SSL needs sasl_mechanism and sasl_username",
        ),
        (
            sasl("SASL_PLAINTEXT", sasl_password=None),
            "security_protocol SASL_PLAINTEXT needs exactly one of sasl_password and "
            "sasl_password_file",
        ),
        (
            sasl(sasl_password_file="PASSWORD_FILE"),
            "security_protocol SASL_SSL needs exactly one of sasl_password and sasl_password_file",
        ),
        (
            {"sasl_username": "voiceclone", "sasl_password": SECRET},
            "sasl_username, sasl_password: used only with security_protocol SASL_SSL or "
            "SASL_PLAINTEXT, not PLAINTEXT",
        ),
        (
            sasl("SASL_PLAINTEXT", ssl_cafile="PASSWORD_FILE"),
            "ssl_cafile: used only with security_protocol SSL or SASL_SSL, not SASL_PLAINTEXT",
        ),
        (
            {"security_protocol": "SSL", "ssl_keyfile": "PASSWORD_FILE"},
            "ssl_keyfile needs ssl_certfile, the certificate it belongs to",
        ),
        ({"security_protocol": "SSL", "ssl_cafile": "/nowhere/ca.pem"}, "Path does not point"),
        (sasl(sasl_mechanism="SCRAM-SHA-1"), "Input should be 'PLAIN', 'SCRAM-SHA-256' or"),
        ({"security_protocol": "TLS"}, "Input should be 'PLAINTEXT', 'SSL'"),
    ],
)
def test_invalid_combinations_are_refused_with_a_clear_error(
    fields: dict[str, Any], message: str, password_file: Path
) -> None:
    fields = {k: password_file if v == "PASSWORD_FILE" else v for k, v in fields.items()}
    with pytest.raises(ValidationError) as raised:
        ClientSettings(kafka=fields)
    assert message in str(raised.value)
    assert SECRET not in str(raised.value)  # the input is not quoted back


def test_an_empty_password_file_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ValidationError, match=f"sasl_password_file {empty} is empty"):
        KafkaSettings(**sasl(sasl_password=None, sasl_password_file=empty))


def test_the_password_file_from_the_environment_is_read_once_at_start(
    password_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in sasl("SASL_PLAINTEXT", sasl_password_file=str(password_file)).items():
        if name != "sasl_password":
            monkeypatch.setenv(f"{ENV}{name.upper()}", value)

    kafka = ClientSettings().kafka
    password_file.unlink()  # read at start: a rotated or removed file changes nothing now

    assert kafka.client_options() == {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-256",
        "sasl_plain_username": "voiceclone",
        "sasl_plain_password": SECRET,  # trailing newline dropped
    }


def test_the_password_never_shows_in_reprs_dumps_or_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(f"{ENV}SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv(f"{ENV}SASL_MECHANISM", "PLAIN")
    monkeypatch.setenv(f"{ENV}SASL_USERNAME", "voiceclone")
    monkeypatch.setenv(f"{ENV}SASL_PASSWORD", SECRET)
    settings = WorkerSettings()
    shown = [repr(settings), str(settings), settings.model_dump_json(), repr(settings.kafka)]
    assert settings.kafka.client_options()["sasl_plain_password"] == SECRET
    assert all(SECRET not in text for text in shown)

    monkeypatch.delenv(f"{ENV}SASL_USERNAME")
    with pytest.raises(ValidationError) as raised:
        WorkerSettings()
    assert "needs sasl_mechanism and sasl_username" in str(raised.value)
    assert SECRET not in str(raised.value)


# --- against the SASL_SSL listener -------------------------------------------------------------


def worker_settings(kafka: KafkaSettings, tmp_path: Path) -> WorkerSettings:
    """A worker on fresh topics of the secured broker; references only from tmp_path/refs."""
    suffix = uuid.uuid4().hex[:8]
    names = ("requests", "audio_ready", "failed", "cancel", "dlq")
    (tmp_path / "refs").mkdir()
    return WorkerSettings(
        kafka=kafka,
        topics=Topics(**{name: f"{name}-{suffix}" for name in names}),
        group_id=f"workers-{suffix}",
        storage=StorageSettings(kind="local", local_root=tmp_path / "audio"),
        reference=ReferenceSettings(allowed_schemes=["file"], file_root=tmp_path / "refs"),
        backend=BackendSettings(kind="http"),  # never reached: the reference is missing
        http={"host": "127.0.0.1", "port": 0},
        poll_timeout_ms=100,
        shutdown_grace_seconds=5,
    )


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN"])
async def test_a_request_goes_round_the_worker_over_sasl_ssl(
    secure_kafka: SecureBroker,
    mechanism: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Topics created, request sent, consumed, answered and the answer read: the admin client,
    the client's producer and consumer, the worker's consumers and its publisher, all on the
    SASL_SSL listener with this mechanism."""
    caplog.set_level(logging.DEBUG, logger="aiokafka")  # requests are logged at DEBUG
    settings = worker_settings(secure_kafka.kafka_settings(sasl_mechanism=mechanism), tmp_path)
    assert sorted(await create_topics(settings, partitions=1)) == sorted(settings.topics.all())
    missing = (tmp_path / "refs" / "missing.wav").as_uri()

    async with running_worker(settings), VoiceCloneClient(settings) as client:
        request_id = await client.request("Hello over TLS.", missing, reference_text="Hi.")
        outcome = await client.wait(request_id, timeout=60)

    assert isinstance(outcome, CloneFailed)
    assert (outcome.request_id, outcome.error_code) == (
        request_id,
        ErrorCode.REFERENCE_AUDIO_UNAVAILABLE,
    )
    assert f"Authenticated as voiceclone via {mechanism}" in caplog.text
    assert secure_kafka.password not in caplog.text
    assert "<SaslAuthenticate request, hidden>" in caplog.text


async def test_a_wrong_password_fails_and_is_named(secure_kafka: SecureBroker) -> None:
    kafka = secure_kafka.kafka_settings(
        sasl_mechanism="SCRAM-SHA-256", sasl_password_file=None, sasl_password=WRONG_PASSWORD
    )

    with pytest.raises(KafkaConnectionError):  # all aiokafka says: "Unable to bootstrap from"
        async with VoiceCloneClient(ClientSettings(kafka=kafka)):
            pass
    explained = await explain_connection_failure(kafka)

    assert explained is not None
    assert explained.startswith(
        f"Kafka at {secure_kafka.bootstrap} rejected the credentials of SASL user 'voiceclone' "
        "(SCRAM-SHA-256): Authentication failed during authentication due to invalid "
        "credentials with SASL mechanism SCRAM-SHA-256; check "
    )
    assert WRONG_PASSWORD not in explained


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        pytest.param(
            {"ssl_cafile": None},
            "its TLS certificate is not trusted (unable to get local issuer certificate); "
            f"set {ENV}SSL_CAFILE to the CA that signed it",
            id="untrusted-ca",
        ),
        pytest.param(
            {"ssl_certfile": None, "ssl_keyfile": None},
            "refused the TLS handshake (SSLV3_ALERT_BAD_CERTIFICATE): does it require a client "
            "certificate",
            id="no-client-certificate",
        ),
        pytest.param(
            {
                "security_protocol": "SASL_PLAINTEXT",
                "ssl_cafile": None,
                "ssl_certfile": None,
                "ssl_keyfile": None,
            },
            "closed the connection without a Kafka answer: is it a TLS listener "
            f"({ENV}SECURITY_PROTOCOL=SSL or SASL_SSL, not SASL_PLAINTEXT)?",
            id="no-tls",
        ),
    ],
)
async def test_tls_mistakes_fail_and_are_named(
    secure_kafka: SecureBroker, overrides: dict[str, Any], expected: str
) -> None:
    kafka = secure_kafka.kafka_settings(**overrides)

    with pytest.raises(KafkaConnectionError):
        await create_topics(ClientSettings(kafka=kafka, topics=Topics(requests="never-made")))
    explained = await explain_connection_failure(kafka)

    assert explained is not None
    assert expected in explained


async def test_the_right_settings_have_nothing_to_explain(secure_kafka: SecureBroker) -> None:
    assert await explain_connection_failure(secure_kafka.kafka_settings()) is None


@pytest.mark.parametrize("command", [["topics", "create"], ["worker"]])
async def test_the_cli_reports_rejected_credentials_in_one_line(
    secure_kafka: SecureBroker, command: list[str], tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOICECLONE_")}
    env |= secure_kafka.client_env
    del env[f"{ENV}SASL_PASSWORD_FILE"]
    env |= {
        f"{ENV}SASL_PASSWORD": WRONG_PASSWORD,
        "VOICECLONE_BACKEND__KIND": "http",
        "VOICECLONE_HTTP__PORT": "0",
        "VOICECLONE_STORAGE__LOCAL_ROOT": str(tmp_path / "audio"),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "consumer",
        *command,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(CLI_TIMEOUT_S):
        out, err = await process.communicate()
    stderr = err.decode()

    assert process.returncode == 3, stderr
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("voiceclone: error: ")]
    assert errors == [
        f"voiceclone: error: Kafka at {secure_kafka.bootstrap} rejected the credentials of SASL "
        "user 'voiceclone' (SCRAM-SHA-512): Authentication failed during authentication due to "
        "invalid credentials with SASL mechanism SCRAM-SHA-512; check "
        f"{ENV}SASL_USERNAME and {ENV}SASL_PASSWORD or {ENV}SASL_PASSWORD_FILE"
    ], stderr
    assert WRONG_PASSWORD not in stderr + out.decode()


# --- the broker manager's SASL_SSL mode --------------------------------------------------------


def test_the_secured_broker_reports_its_listener_and_keeps_it_on_reuse(
    secure_kafka: SecureBroker,
) -> None:
    home = str(secure_kafka.home)
    again = run_broker_cli("--home", home, "start", "--sasl-ssl")
    status = run_broker_cli("--home", home, "status")

    assert again.returncode == 0, again.stderr
    assert "reusing running broker" in again.stderr
    assert f"sasl_ssl_bootstrap={secure_kafka.bootstrap}" in again.stdout.splitlines()
    assert f"sasl_ssl_bootstrap={secure_kafka.bootstrap}" in status.stdout
    # The password and the listener's key stay with their owner.
    for secret in (
        secure_kafka.home / "security" / "sasl-password",
        secure_kafka.home / "config" / "server.properties",
    ):
        assert secret.stat().st_mode & 0o077 == 0, secret
