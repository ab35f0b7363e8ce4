"""Parsed Avro schemas: our reader schemas, and every writer schema we can resolve from them.

Schemas are parsed once, here; codecs only look them up. Each writer schema is identified by
the CRC-64-AVRO (Rabin) fingerprint of its Parsing Canonical Form, as 8 little-endian bytes
(the same fingerprint Avro's single-object encoding uses).
"""

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import fastavro
from fastavro.schema import fingerprint as _fingerprint_hex
from fastavro.schema import to_parsing_canonical_form

from schemas.errors import InvalidSchemaError

AVRO_DIR: Final = Path(__file__).parent / "avro"
# Every released version of every schema, kept so readers still know the fingerprints of
# records written before an upgrade (see history/README.md).
HISTORY_DIR: Final = AVRO_DIR / "history"

RawSchema = Mapping[str, Any]


@dataclass(frozen=True, slots=True, eq=False)
class WriterSchema:
    """A schema records were written with, ready to read them into our reader schema."""

    fullname: str
    fingerprint: bytes
    raw: RawSchema  # the schema JSON as shipped or registered
    parsed: dict[str, Any]  # fastavro-parsed; also what encoders write with
    # Our parsed reader schema of the same name when it differs from this one, else None:
    # None makes fastavro skip schema resolution.
    resolve_into: dict[str, Any] | None


def schema_fingerprint(parsed: dict[str, Any]) -> bytes:
    """CRC-64-AVRO fingerprint of a parsed schema's Parsing Canonical Form (8 bytes)."""
    canonical = to_parsing_canonical_form(parsed)
    return bytes.fromhex(_fingerprint_hex(canonical, "CRC-64-AVRO"))


def load_schema_file(path: Path) -> dict[str, Any]:
    """The JSON of one .avsc file. Each file is self-contained (no external type references)."""
    return json.loads(path.read_text(encoding="utf-8"))


def _parse(raw: RawSchema | str) -> tuple[RawSchema, dict[str, Any], str]:
    """Parse a record schema on its own (no shared named types); returns raw, parsed, name."""
    try:
        # fastavro reads dicts (and strings, lists), not every Mapping.
        schema = json.loads(raw) if isinstance(raw, str) else dict(raw)
        # A fresh named-types table per schema: variants of one record must not clash.
        parsed = fastavro.parse_schema(schema, named_schemas={})
    except Exception as exc:  # fastavro raises many types for bad schemas
        raise InvalidSchemaError(f"not a valid Avro schema: {exc}") from exc
    if not isinstance(parsed, dict) or parsed.get("type") != "record":
        raise InvalidSchemaError("not an Avro record schema")
    return schema, parsed, parsed["name"]


class SchemaStore:
    """Reader schemas (one per record name) plus known writer schemas by fingerprint."""

    def __init__(self, readers: Iterable[RawSchema | str]) -> None:
        self._readers: dict[str, WriterSchema] = {}
        self._by_fingerprint: dict[bytes, WriterSchema] = {}
        for raw in readers:
            schema, parsed, name = _parse(raw)
            reader = WriterSchema(name, schema_fingerprint(parsed), schema, parsed, None)
            self._readers[name] = reader
            self._by_fingerprint[reader.fingerprint] = reader

    @classmethod
    def shipped(cls, extra_dir: Path | None = None) -> "SchemaStore":
        """A store of the .avsc files in schemas/avro/, knowing every released version, plus
        the writer schemas in `extra_dir` (e.g. a newer release's, so its records are readable
        before this reader is upgraded)."""
        store = cls(load_schema_file(path) for path in sorted(AVRO_DIR.glob("*.avsc")))
        for path in sorted(HISTORY_DIR.glob("*.avsc")):
            store.add(load_schema_file(path))
        if extra_dir is not None:
            for path in sorted(extra_dir.glob("*.avsc")):
                store.add_file(path)
        return store

    @property
    def reader_names(self) -> frozenset[str]:
        return frozenset(self._readers)

    def reader(self, fullname: str) -> WriterSchema:
        """Our current schema for a record name; encoders write with it."""
        return self._readers[fullname]

    def get(self, fingerprint: bytes) -> WriterSchema | None:
        """A known writer schema by fingerprint, or None."""
        return self._by_fingerprint.get(fingerprint)

    def resolve(self, raw: RawSchema | str) -> WriterSchema:
        """The WriterSchema for a schema, without remembering it (e.g. one from a registry)."""
        schema, parsed, name = _parse(raw)
        fingerprint = schema_fingerprint(parsed)
        known = self._by_fingerprint.get(fingerprint)
        if known is not None:
            return known
        reader = self._readers.get(name)
        resolve_into = reader.parsed if reader is not None else None
        return WriterSchema(name, fingerprint, schema, parsed, resolve_into)

    def add_file(self, path: Path) -> WriterSchema:
        """Remember the writer schema in an .avsc file, which must be a version of one of our
        records: a stray file fails here, at start, not as wrong_type on every record."""
        try:
            writer = self.resolve(load_schema_file(path))
        except (OSError, ValueError) as exc:  # JSONDecodeError, InvalidSchemaError
            raise InvalidSchemaError(f"{path}: {exc}") from exc
        if writer.fullname not in self._readers:
            raise InvalidSchemaError(
                f"{path}: {writer.fullname} is not one of {', '.join(sorted(self._readers))}"
            )
        return self.add(writer.raw)

    def add(self, raw: RawSchema | str) -> WriterSchema:
        """Remember another writer schema (an older or newer version of one of ours)."""
        writer = self.resolve(raw)
        self._by_fingerprint.setdefault(writer.fingerprint, writer)
        return writer
