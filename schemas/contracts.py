"""The event contracts as a Schema Registry holds them: registering them, checking them.

- `check_history`: each current schema against every released version of its record in
  `avro/history/` (Apache Avro's reader/writer compatibility checker, both directions: the
  project keeps its schemas fully compatible, see avro/history/README.md). No registry needed.
- `check_registry`: each current schema against the latest version registered under its
  subject, by the registry's own verdict at the subject's compatibility level.
- `register`: each current schema under its TopicNameStrategy subject, with that subject's
  compatibility level set; registering twice (or after a doc-only edit) adds no version.

The dead-letter topic has no subject of its own: its records are requests, byte for byte,
carrying the request subject's schema ids.
"""

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from avro.compatibility import ReaderWriterCompatibilityChecker, SchemaCompatibilityType
from avro.schema import parse as parse_avro
from schema_registry.client import AsyncSchemaRegistryClient
from schema_registry.client.errors import ClientError

from schemas.codec import AVRO_DIR, HISTORY_DIR, RawSchema, load_schema_file
from schemas.compatibility import Compatibility
from schemas.events import TOPIC_EVENT_TYPES
from schemas.registry import register_schema, subject_for
from schemas.topics import Topics

# The topics whose records we encode, by Topics field; the DLQ only ever holds copies.
_SUBJECT_FIELDS = ("requests", "audio_ready", "failed", "cancel")


@dataclass(frozen=True)
class Contract:
    """One subject and the schema the working tree says it carries."""

    subject: str
    schema: RawSchema

    @property
    def fullname(self) -> str:
        return _fullname(self.schema)


@dataclass(frozen=True)
class Registered:
    subject: str
    schema_id: int
    new: bool  # registered now, rather than found


def _fullname(schema: RawSchema) -> str:
    name = schema["name"]
    namespace = schema.get("namespace")
    return name if "." in name or not namespace else f"{namespace}.{name}"


def current_schemas(avro_dir: Path = AVRO_DIR) -> dict[str, RawSchema]:
    """The working tree's schemas by record full name."""
    schemas = (load_schema_file(path) for path in sorted(avro_dir.glob("*.avsc")))
    return {_fullname(schema): schema for schema in schemas}


def contracts(topics: Topics, avro_dir: Path = AVRO_DIR) -> list[Contract]:
    """Each subject the product writes to, with its current schema."""
    schemas = current_schemas(avro_dir)
    return [
        Contract(
            subject_for(getattr(topics, field)),
            schemas[TOPIC_EVENT_TYPES[field].avro_name],
        )
        for field in _SUBJECT_FIELDS
    ]


def _incompatibility(reader: RawSchema, writer: RawSchema) -> str | None:
    """Why records written with `writer` cannot be read with `reader`, or None if they can."""
    result = ReaderWriterCompatibilityChecker().get_compatibility(
        parse_avro(json.dumps(reader)), parse_avro(json.dumps(writer))
    )
    if result.compatibility is SchemaCompatibilityType.compatible:
        return None
    where = ", ".join(sorted(result.locations))
    return f"{'; '.join(sorted(result.messages))} (at {where})"


def check_history(avro_dir: Path = AVRO_DIR, history_dir: Path = HISTORY_DIR) -> list[str]:
    """The problems of the current schemas with the released versions; [] when compatible."""
    current = current_schemas(avro_dir)
    problems = []
    for path in sorted(history_dir.glob("*.avsc")):
        released = load_schema_file(path)
        schema = current.get(_fullname(released))
        if schema is None:
            problems.append(f"{path.name}: no current schema of {_fullname(released)}")
            continue
        for direction, reader, writer in (
            ("cannot read", schema, released),
            ("cannot be read by", released, schema),
        ):
            why = _incompatibility(reader, writer)
            if why is not None:
                problems.append(f"{_fullname(schema)} {direction} {path.name}: {why}")
    return problems


async def check_registry(client: AsyncSchemaRegistryClient, items: Iterable[Contract]) -> list[str]:
    """The problems of the current schemas with each subject's latest registered version, by
    the registry's verdict at the subject's level; a subject not registered yet has none."""
    problems = []
    for contract in items:
        if not await client.get_versions(contract.subject):
            continue
        verdict = await client.test_compatibility(
            contract.subject, dict(contract.schema), verbose=True
        )
        if isinstance(verdict, dict) and not verdict.get("is_compatible", False):
            reason = verdict.get("reason") or verdict.get("messages") or "no reason given"
            problems.append(f"{contract.subject}: incompatible with its latest version: {reason}")
    return problems


async def _set_level(client: AsyncSchemaRegistryClient, subject: str, level: Compatibility) -> None:
    try:
        await client.update_compatibility(level.value, subject)
    except ClientError as exc:
        # Apicurio keeps NONE as "no rule", and answers 404 when there is none to drop.
        if not (level is Compatibility.NONE and exc.http_code == 404):
            raise


async def register(
    client: AsyncSchemaRegistryClient, items: Iterable[Contract], level: Compatibility
) -> list[Registered]:
    """Set each subject's compatibility level, then register its schema unless it is there."""
    done = []
    for contract in items:
        await _set_level(client, contract.subject, level)
        schema_id, new = await register_schema(client, contract.subject, contract.schema)
        done.append(Registered(contract.subject, schema_id, new))
    return done
