"""Settings shared by everything that talks to Kafka: the client library, the CLI and the worker.

One settings object per process, read from the environment (prefix ``VOICECLONE_``, nested
groups joined with ``__``, e.g. ``VOICECLONE_KAFKA__BOOTSTRAP_SERVERS``). Nothing else reads
the environment.
"""

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from producer.storage.settings import StorageSettings
from schemas.topics import Topics


class KafkaSettings(BaseModel):
    """How to reach the Kafka cluster."""

    bootstrap_servers: str = Field(
        "127.0.0.1:9092", description="Comma-separated host:port list of Kafka brokers."
    )
    client_id: str = Field("voiceclone", description="Client id reported to the brokers.")
    topic_partitions: int = Field(
        6, ge=1, description="Partitions for topics created by `voiceclone topics create`."
    )
    topic_replication_factor: int = Field(
        1, ge=1, description="Replication factor for topics created by `voiceclone topics create`."
    )


class ClientSettings(BaseSettings):
    """Settings for producers of requests and subscribers to outcomes."""

    model_config = SettingsConfigDict(
        env_prefix="VOICECLONE_", env_nested_delimiter="__", extra="ignore"
    )

    kafka: KafkaSettings = KafkaSettings()
    topics: Topics = Topics()
    schema_registry_url: str | None = Field(
        None,
        description="Confluent-compatible Schema Registry URL. Unset: schemaless Avro with the "
        "writer schema's fingerprint in a header.",
    )
    storage: StorageSettings = StorageSettings()
