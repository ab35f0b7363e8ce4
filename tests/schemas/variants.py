"""Test-local versions of the shipped schemas: older ones (fields removed) and newer ones
(fields and enum symbols added), derived from the .avsc files so they track them."""

import copy
import io
from collections.abc import Iterator, Mapping
from typing import Any

import fastavro

from schemas.codec import (
    AVRO_DIR,
    EVENT_TYPE_HEADER,
    FINGERPRINT_HEADER,
    Encoded,
    load_schema_file,
    schema_fingerprint,
)
from schemas.registry import MAGIC_BYTE

Json = dict[str, Any]


def shipped(stem: str) -> Json:
    return load_schema_file(AVRO_DIR / f"{stem}.avsc")


def without_fields(schema: Json, *names: str) -> Json:
    changed = copy.deepcopy(schema)
    changed["fields"] = [field for field in changed["fields"] if field["name"] not in names]
    return changed


def with_fields(schema: Json, *fields: Json) -> Json:
    changed = copy.deepcopy(schema)
    changed["fields"].extend(copy.deepcopy(list(fields)))
    return changed


def _named(node: Any, name: str) -> Iterator[Json]:
    if isinstance(node, list):
        for item in node:
            yield from _named(item, name)
    elif isinstance(node, dict):
        if node.get("name") == name and node.get("type") in ("enum", "record"):
            yield node
        for key in ("type", "fields"):
            if isinstance(node.get(key), list | dict):
                yield from _named(node[key], name)


def with_symbol(schema: Json, enum_name: str, symbol: str) -> Json:
    changed = copy.deepcopy(schema)
    [enum] = _named(changed, enum_name)
    enum["symbols"].append(symbol)
    return changed


def without_symbol(schema: Json, enum_name: str, symbol: str) -> Json:
    changed = copy.deepcopy(schema)
    [enum] = _named(changed, enum_name)
    enum["symbols"].remove(symbol)
    return changed


def avro_bytes(schema: Json, record: Mapping[str, Any]) -> bytes:
    """The record written with `schema` by plain fastavro (as another team's producer would)."""
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, fastavro.parse_schema(schema, named_schemas={}), record)
    return buffer.getvalue()


def schemaless_record(schema: Json, record: Mapping[str, Any]) -> Encoded:
    """A schemaless-mode Kafka record written with `schema`, headers and all."""
    parsed = fastavro.parse_schema(schema, named_schemas={})
    fullname = parsed["name"]
    headers = [
        (FINGERPRINT_HEADER, schema_fingerprint(parsed)),
        (EVENT_TYPE_HEADER, fullname.encode()),
    ]
    return Encoded(avro_bytes(schema, record), headers)


def single_object_record(schema: Json, record: Mapping[str, Any]) -> Encoded:
    """The record in Avro's single-object encoding, by plain fastavro (no code of ours): marker
    C3 01, the CRC-64-AVRO fingerprint of the Parsing Canonical Form (fastavro's hex string is
    the 8 little-endian bytes), the Avro binary."""
    canonical = fastavro.schema.to_parsing_canonical_form(schema)
    fingerprint = bytes.fromhex(fastavro.schema.fingerprint(canonical, "CRC-64-AVRO"))
    return Encoded(b"\xc3\x01" + fingerprint + avro_bytes(schema, record), [])


def registry_record(schema_id: int, schema: Json, record: Mapping[str, Any]) -> Encoded:
    """A Confluent wire-format record written with `schema`, registered as `schema_id`."""
    prefix = bytes([MAGIC_BYTE]) + schema_id.to_bytes(4, "big")
    return Encoded(prefix + avro_bytes(schema, record), [])
