"""The configuration table of docs/configuration.md, generated from the settings models so it
cannot drift."""

import json

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from consumer.settings import WorkerSettings

BEGIN = "<!-- config-table:begin -->"
END = "<!-- config-table:end -->"


def _rows(model: type[BaseModel], prefix: str) -> list[tuple[str, str, str]]:
    rows = []
    for name, info in model.model_fields.items():
        env = f"{prefix}{name.upper()}"
        nested = _nested_model(info)
        if nested is not None:
            rows.extend(_rows(nested, f"{env}__"))
        else:
            rows.append((env, _default(info), info.description or ""))
    return rows


def _nested_model(info: FieldInfo) -> type[BaseModel] | None:
    annotation = info.annotation
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _default(info: FieldInfo) -> str:
    value = info.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if hasattr(value, "get_secret_value"):
        return "unset" if not value.get_secret_value() else "(secret)"
    if isinstance(value, list):
        return json.dumps(value)  # pydantic-settings reads list variables as JSON
    return str(getattr(value, "value", value))


def env_names() -> list[str]:
    """Every environment variable the worker reads."""
    return [env for env, _, _ in _rows(WorkerSettings, "VOICECLONE_")]


def render() -> str:
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for env, default, description in _rows(WorkerSettings, "VOICECLONE_"):
        lines.append(f"| `{env}` | `{default}` | {description} |")
    return "\n".join([BEGIN, *lines, END])


if __name__ == "__main__":
    print(render())
