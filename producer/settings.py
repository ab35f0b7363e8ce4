"""Settings shared by everything that talks to Kafka: the client library, the CLI and the worker.

One settings object per process, read from the environment (prefix ``VOICECLONE_``, nested
groups joined with ``__``, e.g. ``VOICECLONE_KAFKA__BOOTSTRAP_SERVERS``). Nothing else reads
the environment.
"""

import logging
from enum import StrEnum
from typing import Annotated, Any, Self

from aiokafka.helpers import create_ssl_context
from pydantic import (
    BaseModel,
    ConfigDict,
    DirectoryPath,
    Field,
    FilePath,
    PrivateAttr,
    SecretStr,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from producer.caseless import CaseInsensitive
from producer.storage.settings import StorageSettings
from schemas.codec import Codec, SchemalessForm, SchemaStore
from schemas.compatibility import Compatibility
from schemas.topics import Topics
from schemas.wire_format import make_codec


class SecurityProtocol(StrEnum):
    """How clients talk to the brokers: Kafka's own names."""

    PLAINTEXT = "PLAINTEXT"
    SSL = "SSL"
    SASL_PLAINTEXT = "SASL_PLAINTEXT"
    SASL_SSL = "SASL_SSL"

    @property
    def uses_tls(self) -> bool:
        return self in (SecurityProtocol.SSL, SecurityProtocol.SASL_SSL)

    @property
    def uses_sasl(self) -> bool:
        return self in (SecurityProtocol.SASL_PLAINTEXT, SecurityProtocol.SASL_SSL)


class SaslMechanism(StrEnum):
    PLAIN = "PLAIN"
    SCRAM_SHA_256 = "SCRAM-SHA-256"
    SCRAM_SHA_512 = "SCRAM-SHA-512"


class LogFormat(StrEnum):
    JSON = "json"
    CONSOLE = "console"


class LogLevel(StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class KafkaSettings(BaseModel):
    """How to reach the Kafka cluster, and how to prove who we are to it."""

    # A validation error would otherwise quote its input, the password among it.
    model_config = ConfigDict(hide_input_in_errors=True)

    bootstrap_servers: str = Field(
        default="127.0.0.1:9092", description="Comma-separated host:port list of Kafka brokers."
    )
    client_id: str = Field(default="voiceclone", description="Client id reported to the brokers.")
    topic_partitions: int = Field(
        default=6, ge=1, description="Partitions for topics created by `voiceclone topics create`."
    )
    topic_replication_factor: int = Field(
        default=1,
        ge=1,
        description="Replication factor for topics created by `voiceclone topics create`.",
    )
    security_protocol: Annotated[SecurityProtocol, CaseInsensitive()] = Field(
        default=SecurityProtocol.PLAINTEXT,
        description="`PLAINTEXT`, `SSL` (TLS), `SASL_PLAINTEXT` or `SASL_SSL` (SASL over TLS).",
    )
    sasl_mechanism: Annotated[SaslMechanism, CaseInsensitive()] | None = Field(
        default=None,
        description="`PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`; required with the SASL "
        "protocols, like `sasl_username` and a password.",
    )
    sasl_username: str | None = Field(default=None, description="SASL user name.")
    sasl_password: SecretStr | None = Field(
        default=None, description="SASL password; never logged. Or use `sasl_password_file`."
    )
    sasl_password_file: FilePath | None = Field(
        default=None,
        description="File holding the SASL password (a mounted secret, say), read once at start; "
        "a trailing newline is ignored.",
    )
    ssl_cafile: FilePath | None = Field(
        default=None,
        description="PEM file of the CA certificates that signed the brokers' certificates. "
        "Unset: the system's trusted CAs.",
    )
    ssl_certfile: FilePath | None = Field(
        default=None,
        description="PEM client certificate (chain), for brokers that require TLS client "
        "authentication.",
    )
    ssl_keyfile: FilePath | None = Field(
        default=None,
        description="PEM private key (unencrypted) of `ssl_certfile`. Unset: the key is in "
        "`ssl_certfile`.",
    )
    retry_backoff_ms: int = Field(
        default=100,
        ge=1,
        description="aiokafka's wait before it tries a failed request again (finding the "
        "group coordinator, a fetch, a produce request).",
    )
    reconnect_backoff_ms: int = Field(
        default=100,
        ge=1,
        description="Wait after a failed metadata refresh (no broker answers) before the next; "
        "doubled after each further failure, up to `reconnect_backoff_max_ms`.",
    )
    reconnect_backoff_max_ms: int = Field(
        default=2000,
        ge=1,
        description="Longest wait between metadata refreshes while no broker answers: how long "
        "a worker may take to notice that the cluster is back.",
    )
    _password: SecretStr | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _check_security(self) -> Self:
        self._check_sasl()
        self._check_tls()
        self._password = self.sasl_password or _read_password(self.sasl_password_file)
        return self

    def _check_sasl(self) -> None:
        sasl_fields = ("sasl_mechanism", "sasl_username", "sasl_password", "sasl_password_file")
        if not self.security_protocol.uses_sasl:
            _forbid(self, sasl_fields, "SASL_SSL or SASL_PLAINTEXT")
            return
        if self.sasl_mechanism is None or not self.sasl_username:
            raise ValueError(
                f"security_protocol {self.security_protocol} needs sasl_mechanism and sasl_username"
            )
        if (self.sasl_password is None) == (self.sasl_password_file is None):
            raise ValueError(
                f"security_protocol {self.security_protocol} needs exactly one of sasl_password "
                "and sasl_password_file"
            )

    def _check_tls(self) -> None:
        if not self.security_protocol.uses_tls:
            tls_fields = ("ssl_cafile", "ssl_certfile", "ssl_keyfile")
            _forbid(self, tls_fields, "SSL or SASL_SSL")
        if self.ssl_keyfile is not None and self.ssl_certfile is None:
            raise ValueError("ssl_keyfile needs ssl_certfile, the certificate it belongs to")

    def reconnect_backoff_seconds(self, failures: int) -> float:
        """The wait after `failures` metadata refreshes in a row failed (1: the first)."""
        backoff_ms = self.reconnect_backoff_ms * 2 ** min(failures - 1, 30)
        return min(backoff_ms, self.reconnect_backoff_max_ms) / 1000

    def backoff_options(self) -> dict[str, Any]:
        """aiokafka's retry backoff, for the clients of long-running processes (the worker)."""
        return {"retry_backoff_ms": self.retry_backoff_ms}

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments for every AIOKafkaProducer, AIOKafkaConsumer and
        AIOKafkaAdminClient: TLS and SASL as configured (the password in clear: pass it on,
        never log it)."""
        options: dict[str, Any] = {"security_protocol": self.security_protocol.value}
        if self.security_protocol.uses_tls:
            # Verifies the broker's certificate and host name, against the system's CAs if unset.
            options["ssl_context"] = create_ssl_context(
                cafile=self.ssl_cafile, certfile=self.ssl_certfile, keyfile=self.ssl_keyfile
            )
        if self.sasl_mechanism is not None and self._password is not None:
            _hide_sasl_tokens_from_aiokafka_logs()
            options |= {
                "sasl_mechanism": self.sasl_mechanism.value,
                "sasl_plain_username": self.sasl_username,
                "sasl_plain_password": self._password.get_secret_value(),
            }
        return options


class _HideSaslTokens(logging.Filter):
    """aiokafka logs every request it sends at DEBUG, SaslAuthenticate too, whose bytes are the
    password itself with PLAIN: those arguments are replaced before any handler formats them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                "<SaslAuthenticate request, hidden>"
                if type(arg).__name__.startswith("SaslAuthenticateRequest")
                else arg
                for arg in record.args
            )
        return True


_SASL_TOKEN_FILTER = _HideSaslTokens()


def _hide_sasl_tokens_from_aiokafka_logs() -> None:
    logger = logging.getLogger("aiokafka.conn")
    if _SASL_TOKEN_FILTER not in logger.filters:
        logger.addFilter(_SASL_TOKEN_FILTER)


def _forbid(settings: KafkaSettings, names: tuple[str, ...], protocols: str) -> None:
    """A setting that the protocol would ignore is a mistake worth stopping for."""
    given = [name for name in names if getattr(settings, name) is not None]
    if given:
        raise ValueError(
            f"{', '.join(given)}: used only with security_protocol {protocols}, "
            f"not {settings.security_protocol}"
        )


def _read_password(path: FilePath | None) -> SecretStr | None:
    if path is None:
        return None
    try:
        password = path.read_text().rstrip("\r\n")
    except OSError as exc:
        raise ValueError(f"cannot read sasl_password_file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:  # its message would quote a byte of the secret
        raise ValueError(f"sasl_password_file {path} is not UTF-8 text") from None
    if not password:
        raise ValueError(f"sasl_password_file {path} is empty")
    return SecretStr(password)


class ClientSettings(BaseSettings):
    """Settings for producers of requests and subscribers to outcomes."""

    model_config = SettingsConfigDict(
        env_prefix="VOICECLONE_",
        env_nested_delimiter="__",
        extra="ignore",
        hide_input_in_errors=True,  # the input holds the secrets (Kafka, S3) in clear
    )

    log_format: Annotated[LogFormat, CaseInsensitive()] = Field(
        default=LogFormat.JSON,
        description="Logs on stderr: `json` lines, or `console` for people; `--log-format` "
        "overrides it.",
    )
    log_level: Annotated[LogLevel, CaseInsensitive()] = Field(
        default=LogLevel.INFO,
        description="Lowest level logged: `debug`, `info`, `warning` or `error`; `--log-level` "
        "overrides it.",
    )
    kafka: KafkaSettings = KafkaSettings()
    topics: Topics = Topics()
    schema_registry_url: str | None = Field(
        default=None,
        description="Confluent-compatible Schema Registry URL. Unset: schemaless Avro, each "
        "record naming its writer schema by fingerprint.",
    )
    schema_registry_auto_register: bool = Field(
        default=False,
        description="Registry mode: register an event schema the registry lacks when first "
        "writing it. Off: only look it up (`unknown_schema` when absent), as production "
        "registries are usually write-protected; register with `voiceclone schemas register`.",
    )
    schema_registry_compatibility: Annotated[Compatibility, CaseInsensitive()] = Field(
        default=Compatibility.BACKWARD,
        description="The compatibility level `voiceclone schemas register` sets on each "
        "subject: `BACKWARD`, `BACKWARD_TRANSITIVE`, `FORWARD`, `FORWARD_TRANSITIVE`, `FULL`, "
        "`FULL_TRANSITIVE` or `NONE`.",
    )
    schemaless_form: SchemalessForm = Field(
        default=SchemalessForm.SINGLE_OBJECT,
        description="Schemaless mode: how events are written (both are read). `single_object`: "
        "Avro single-object encoding; `header`: bare Avro with the fingerprint in the "
        "`voiceclone-schema` header, the only form releases before it read.",
    )
    extra_schemas_dir: DirectoryPath | None = Field(
        default=None,
        description="Schemaless mode: a folder of `.avsc` files, newer versions of the event "
        "schemas, whose records are then read too (by Avro schema resolution).",
    )
    storage: StorageSettings = StorageSettings()

    def make_codec(self) -> Codec:
        """The codec these settings describe; loads the extra schemas (InvalidSchemaError)."""
        return make_codec(
            self.schema_registry_url,
            form=self.schemaless_form,
            store=SchemaStore.shipped(self.extra_schemas_dir),
            auto_register=self.schema_registry_auto_register,
        )
