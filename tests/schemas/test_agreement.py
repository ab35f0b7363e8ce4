"""The .avsc files and the pydantic models describe the same events, exactly.

Walks each Avro schema alongside the model's JSON schema (which exposes pydantic's types,
bounds, nullability, enum values and defaults uniformly): record names and field order,
Avro type vs Python type, nullability, enum symbols, and defaults must all match.
"""

import json
import math
from collections.abc import Callable, Iterator
from enum import Enum
from typing import Any

import pytest
from pydantic import ValidationError

from schemas import events, vocabulary
from schemas.codec import AVRO_DIR, SchemaStore, load_schema_file
from schemas.events import EVENT_TYPES, INT32_MAX, INT32_MIN, INT64_MAX, INT64_MIN
from schemas.vocabulary import PARAM_RULES, ModelSize

Json = dict[str, Any]
_INT_RANGES = {"int": (INT32_MIN, INT32_MAX), "long": (INT64_MIN, INT64_MAX)}
_PRIMITIVES = {"string": "string", "boolean": "boolean", "double": "number"}
_NULL = {"type": "null"}


def _avro_schemas() -> dict[str, Json]:
    """Shipped schema JSON by record full name."""
    found = {}
    for path in sorted(AVRO_DIR.glob("*.avsc")):
        schema = load_schema_file(path)
        found[f"{schema['namespace']}.{schema['name']}"] = schema
    return found


AVRO = _avro_schemas()


class Walk:
    """Compares one Avro schema with one pydantic JSON schema, collecting mismatches."""

    def __init__(self, json_schema: Json) -> None:
        self.defs: Json = json_schema.get("$defs", {})
        self.errors: list[str] = []

    def deref(self, node: Json) -> Json:
        ref = node.get("$ref")
        return self.defs[ref.removeprefix("#/$defs/")] if ref else node

    def expect(self, ok: bool, path: str, message: str) -> None:
        if not ok:
            self.errors.append(f"{path}: {message}")

    def type(self, avro: Any, node: Json, path: str) -> None:
        node = self.deref(node)
        if isinstance(avro, list):
            self.union(avro, node, path)
            return
        avro = {"type": avro} if isinstance(avro, str) else avro
        if avro.get("logicalType") == "timestamp-millis":
            self.expect(
                node.get("type") == "string" and node.get("format") == "date-time",
                path,
                f"timestamp-millis but pydantic has {node}",
            )
            return
        check = _CHECKS.get(avro["type"])
        self.expect(check is not None, path, f"no mapping for Avro type {avro['type']}")
        if check is not None:
            check(self, avro, node, path)

    def union(self, avro: list[Any], node: Json, path: str) -> None:
        # The schemas only use unions to make a field nullable: ["null", T].
        options = node.get("anyOf", [])
        self.expect(len(avro) == 2 and avro[0] == "null", path, f"union {avro} is not [null, T]")
        self.expect(
            len(options) == 2 and _NULL in options, path, f"nullable in Avro, not in {node}"
        )
        if len(avro) == 2 and len(options) == 2 and _NULL in options:
            other = next(option for option in options if option != _NULL)
            self.type(avro[1], other, path)

    def primitive(self, avro: Json, node: Json, path: str) -> None:
        wanted = _PRIMITIVES[avro["type"]]
        self.expect(node.get("type") == wanted, path, f"{avro['type']} but pydantic has {node}")

    def integer(self, avro: Json, node: Json, path: str) -> None:
        low, high = _INT_RANGES[avro["type"]]
        self.expect(node.get("type") == "integer", path, f"{avro['type']} but not an int")
        self.expect(
            low <= node.get("minimum", low - 1) and node.get("maximum", high + 1) <= high,
            path,
            f"Python int must be bounded to the Avro {avro['type']} range",
        )

    def enum(self, avro: Json, node: Json, path: str) -> None:
        self.expect(node.get("title") == avro["name"], path, "enum names differ")
        self.expect(node.get("enum") == avro["symbols"], path, "enum symbols differ")
        self.expect("default" in avro, path, "enum has no default symbol for unknown symbols")

    def map(self, avro: Json, node: Json, path: str) -> None:
        self.expect(node.get("type") == "object", path, f"map but pydantic has {node}")
        self.type(avro["values"], node.get("additionalProperties", {}), f"{path}[]")

    def record(self, avro: Json, node: Json, path: str) -> None:
        self.expect(node.get("title") == avro["name"], path, "record names differ")
        properties = node.get("properties", {})
        names = [field["name"] for field in avro["fields"]]
        self.expect(list(properties) == names, path, f"fields {list(properties)} != {names}")
        required = {field["name"] for field in avro["fields"] if "default" not in field}
        self.expect(set(node.get("required", [])) == required, path, "required fields differ")
        for field in avro["fields"]:
            sub = properties.get(field["name"])
            if sub is not None:
                self.field(field, sub, f"{path}.{field['name']}")

    def field(self, field: Json, node: Json, path: str) -> None:
        self.type(field["type"], node, path)
        if "default" in field:
            self.expect(
                node.get("default", "<none>") == field["default"],
                path,
                f"default {node.get('default', '<none>')!r} != Avro {field['default']!r}",
            )


_CHECKS: dict[str, Callable[[Walk, Json, Json, str], None]] = {
    "string": Walk.primitive,
    "boolean": Walk.primitive,
    "double": Walk.primitive,
    "int": Walk.integer,
    "long": Walk.integer,
    "enum": Walk.enum,
    "map": Walk.map,
    "record": Walk.record,
}


@pytest.mark.parametrize("fullname", sorted(EVENT_TYPES))
def test_model_matches_avro_schema(fullname: str) -> None:
    walk = Walk(EVENT_TYPES[fullname].model_json_schema())
    walk.type(AVRO[fullname], EVENT_TYPES[fullname].model_json_schema(), fullname)
    assert walk.errors == []


def test_every_event_type_has_exactly_one_schema_file() -> None:
    assert set(AVRO) == set(EVENT_TYPES)
    assert SchemaStore.shipped().reader_names == set(EVENT_TYPES)


def test_agreement_check_catches_differences() -> None:
    """The walker itself must fail on a mismatch, or the test above proves nothing."""
    avro = json.loads(json.dumps(AVRO[events.CloneRequest.avro_name]))
    avro["fields"][0]["type"] = "int"  # request_id
    avro["fields"][5]["type"]["symbols"].append("QWEN4")  # model
    avro["fields"][10]["default"] = {"x": "y"}  # metadata
    walk = Walk(events.CloneRequest.model_json_schema())
    walk.type(avro, events.CloneRequest.model_json_schema(), "CloneRequest")
    assert {error.split(":")[0] for error in walk.errors} == {
        "CloneRequest.request_id",
        "CloneRequest.model",
        "CloneRequest.metadata",
    }


def test_enum_values_are_their_avro_symbols() -> None:
    enums = [
        e
        for e in vars(vocabulary).values()
        if isinstance(e, type) and issubclass(e, Enum) and e.__module__ == vocabulary.__name__
        if e is not ModelSize  # a deployment key, not an Avro type
    ]
    assert {e.__name__ for e in enums} == {
        "Language",
        "ModelName",
        "AudioFormat",
        "ErrorCode",
    }
    for enum in enums:
        assert all(member.name == member.value for member in enum), enum


def _named_types(node: Any) -> Iterator[Json]:
    if isinstance(node, list):
        for item in node:
            yield from _named_types(item)
    elif isinstance(node, dict):
        if node.get("type") in ("record", "enum", "fixed"):
            yield node
        for key in ("type", "fields", "items", "values"):
            if key in node and node[key] is not node:
                yield from _named_types(node[key])


def test_types_defined_in_several_files_are_identical() -> None:
    seen: dict[str, Json] = {}
    for fullname, schema in AVRO.items():
        for named in _named_types(schema):
            first = seen.setdefault(named["name"], named)
            assert first == named, f"{named['name']} in {fullname} differs from its twin"
    assert {"Language", "ModelName", "AudioFormat"} <= set(seen)


def _documented(node: Any, path: str) -> Iterator[str]:
    """Paths of named types and fields lacking a doc."""
    for named in _named_types(node):
        if not named.get("doc"):
            yield f"{path}:{named['name']}"
        for field in named.get("fields", []):
            if not field.get("doc"):
                yield f"{path}:{named['name']}.{field['name']}"


@pytest.mark.parametrize("fullname", sorted(AVRO))
def test_every_type_and_field_is_documented(fullname: str) -> None:
    assert list(_documented(AVRO[fullname], fullname)) == []


@pytest.mark.parametrize("fullname", sorted(AVRO))
def test_schema_file_is_self_contained(fullname: str) -> None:
    """Each file parses alone, so other teams can use one without the rest."""
    assert SchemaStore([AVRO[fullname]]).reader_names == {fullname}


# -- the ranges the request's docs state are the ones the code enforces ------------------------


def _documented_fields(avro: Json, node: Json, walk: Walk, path: str) -> Iterator[Json]:
    """Each field of an Avro record, nested records included, as {path, doc, avro, model}:
    its Avro type and the model's JSON schema node, both without the null of a union."""
    properties = walk.deref(node).get("properties", {})
    for field in avro["fields"]:
        avro_type, model = field["type"], walk.deref(properties[field["name"]])
        if isinstance(avro_type, list):
            avro_type = next(option for option in avro_type if option != "null")
            model = walk.deref(next(o for o in model["anyOf"] if o != _NULL))
        where = f"{path}.{field['name']}"
        yield {"path": where, "doc": field["doc"], "avro": avro_type, "model": model}
        if isinstance(avro_type, dict) and avro_type["type"] == "record":
            yield from _documented_fields(avro_type, model, walk, where)


REQUEST_FIELDS = {
    field["path"]: field
    for field in _documented_fields(
        AVRO[events.CloneRequest.avro_name],
        events.CloneRequest.model_json_schema(),
        Walk(events.CloneRequest.model_json_schema()),
        "",
    )
}


@pytest.mark.parametrize("path", sorted(REQUEST_FIELDS))
def test_request_docs_state_the_models_string_rules(path: str) -> None:
    field = REQUEST_FIELDS[path]
    if field["model"].get("minLength") == 1:
        assert "non-empty" in field["doc"]
    if "pattern" in field["model"]:
        assert field["model"]["pattern"].strip("^$") in field["doc"]


@pytest.mark.parametrize("field", ["request_id", "tenant_id"])
def test_request_id_docs_state_the_workers_rule(field: str) -> None:
    assert events.SAFE_ID_PATTERN.strip("^$") in REQUEST_FIELDS[f".{field}"]["doc"]


@pytest.mark.parametrize("name", sorted(PARAM_RULES))
def test_generation_docs_state_the_engines_rules(name: str) -> None:
    field = REQUEST_FIELDS[f".generation.{name}"]
    assert PARAM_RULES[name].words in field["doc"]
    if field["avro"] == "double":  # the model refuses what Avro can carry but no engine takes
        assert "a finite number" in field["doc"]
        for value in (math.nan, math.inf, -math.inf):
            with pytest.raises(ValidationError, match=name):
                events.GenerationRecord(**{name: value})
