"""Why a Kafka client could not connect, when the security settings are the reason.

aiokafka's clients answer every failed bootstrap with the same `KafkaConnectionError: Unable to
bootstrap from [...]`, whether the broker is down, rejected our password or our certificate.
`explain_connection_failure` connects once more to each bootstrap server with the same options
and names what went wrong, in one line that points at the setting to fix; it never includes the
password.
"""

import asyncio
import ssl
from asyncio import IncompleteReadError

from aiokafka.conn import collect_hosts, create_conn
from aiokafka.errors import (
    KafkaConnectionError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)

from producer.settings import KafkaSettings

_PROBE_TIMEOUT_S = 5.0
_ENV = "VOICECLONE_KAFKA__"


async def explain_connection_failure(kafka: KafkaSettings) -> str | None:
    """What a bootstrap server says about our TLS and SASL settings, in one line; None when
    every one that answers accepts them (then the failure is elsewhere: a broker down, say)."""
    # The clients' own parsing of the list: default port, IPv6 brackets.
    for host, port, _ in collect_hosts(kafka.bootstrap_servers, randomize=False):
        try:
            async with asyncio.timeout(_PROBE_TIMEOUT_S):
                connection = await create_conn(host, port, **kafka.client_options())
        except (OSError, TimeoutError, KafkaConnectionError) as exc:
            explained = _explain(exc, f"Kafka at {host}:{port}", kafka)
        except (SaslAuthenticationFailed, UnsupportedSaslMechanismError) as exc:
            explained = _explain_sasl(exc, f"Kafka at {host}:{port}", kafka)
        else:
            connection.close()
            continue
        if explained is not None:
            return explained
    return None


def _explain_sasl(exc: Exception, where: str, kafka: KafkaSettings) -> str:
    if isinstance(exc, UnsupportedSaslMechanismError):
        return f"{where}: {exc.args[0] if exc.args else exc}; set {_ENV}SASL_MECHANISM"
    # The broker's own words, e.g. "... invalid credentials with SASL mechanism SCRAM-SHA-256".
    reason = exc.args[0] if exc.args else "authentication failed"
    return (
        f"{where} rejected the credentials of SASL user {kafka.sasl_username!r} "
        f"({kafka.sasl_mechanism}): {reason}; check {_ENV}SASL_USERNAME and "
        f"{_ENV}SASL_PASSWORD or {_ENV}SASL_PASSWORD_FILE"
    )


def _explain(exc: BaseException, where: str, kafka: KafkaSettings) -> str | None:
    """TLS trouble, or a listener that speaks another protocol; None for a plain outage."""
    cause = exc.__cause__ if isinstance(exc, KafkaConnectionError) else exc
    if isinstance(cause, ssl.SSLCertVerificationError):
        return (
            f"{where}: its TLS certificate is not trusted ({cause.verify_message}); set "
            f"{_ENV}SSL_CAFILE to the CA that signed it"
        )
    if isinstance(cause, ssl.SSLError):
        return (
            f"{where} refused the TLS handshake ({cause.reason}): does it require a client "
            f"certificate ({_ENV}SSL_CERTFILE, {_ENV}SSL_KEYFILE) from another CA?"
        )
    protocol = kafka.security_protocol
    if isinstance(cause, IncompleteReadError) and not protocol.uses_tls:
        return (
            f"{where} closed the connection without a Kafka answer: is it a TLS listener "
            f"({_ENV}SECURITY_PROTOCOL=SSL or SASL_SSL, not {protocol})?"
        )
    if isinstance(cause, ConnectionResetError) and protocol.uses_tls:
        return (
            f"{where} reset the TLS handshake: is it a listener without TLS "
            f"({_ENV}SECURITY_PROTOCOL=PLAINTEXT or SASL_PLAINTEXT, not {protocol})?"
        )
    return None
