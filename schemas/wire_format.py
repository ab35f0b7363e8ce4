"""Which wire format a process speaks: `make_codec` picks it once, at start.

Its own module above both codecs (schemas/codec.py, and schemas/registry.py built on it): the
picker names both, so inside either it would make an import cycle. The registry's codec and its
client are loaded only when a registry is configured.
"""

from schemas.codec import (
    DEFAULT_MAX_VALUE_BYTES,
    Codec,
    SchemalessCodec,
    SchemalessForm,
    SchemaStore,
)
from schemas.topics import Topics


def make_codec(
    schema_registry_url: str | None = None,
    *,
    form: SchemalessForm = SchemalessForm.SINGLE_OBJECT,
    topics: Topics | None = None,
    store: SchemaStore | None = None,
    max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
    auto_register: bool = True,
) -> Codec:
    """A registry codec when a registry URL is given, else the schemaless one.

    form only applies to the schemaless codec: how it writes. auto_register only applies to the
    registry: when False, encode looks schemas up but never registers them (for registries only
    CI may write to).
    """
    if not schema_registry_url:
        return SchemalessCodec(
            form=form, topics=topics, store=store, max_value_bytes=max_value_bytes
        )
    # Imported here so schemaless deployments never load the registry client and its deps.
    from schema_registry.client import AsyncSchemaRegistryClient

    from schemas.registry import RegistryCodec

    return RegistryCodec(
        AsyncSchemaRegistryClient(schema_registry_url),
        topics=topics,
        store=store,
        max_value_bytes=max_value_bytes,
        auto_register=auto_register,
    )
