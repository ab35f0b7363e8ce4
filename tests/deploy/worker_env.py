"""Which environment variables the worker reads, to hold deploy files to them.

`voiceclone worker` reads its settings (every field of WorkerSettings, nested groups joined by
`__`: `consumer.config_doc.env_names()` walks the model, the same walk that writes the docs'
table); its options read no variables. The Modal client in the worker reads its token from two
variables of its own.
"""

import os
from collections.abc import Iterable, Mapping

import pytest

from consumer.config_doc import env_names
from consumer.settings import WorkerSettings

PREFIX = "VOICECLONE_"
# Read by the Modal client, not by our settings (docs/gpu-service.md: "How the worker finds it").
OUTSIDE_VARIABLES = frozenset({"MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET"})


def worker_env_names() -> frozenset[str]:
    """Every VOICECLONE_* variable `voiceclone worker` reads."""
    return frozenset(env_names())


def unread_variables(names: Iterable[str]) -> list[str]:
    """The names the worker does not read: typos, stale settings, or a missing prefix."""
    known = worker_env_names() | OUTSIDE_VARIABLES
    return sorted(set(names) - known)


def environment_names(environment: Mapping[str, object] | list[str] | None) -> set[str]:
    """Variable names of a compose `environment:` (mapping, or list of NAME=VALUE)."""
    if environment is None:
        return set()
    if isinstance(environment, list):
        return {item.split("=", 1)[0] for item in environment}
    return set(environment)


def parse_settings(env: Mapping[str, str], monkeypatch: pytest.MonkeyPatch) -> WorkerSettings:
    """The WorkerSettings the worker would build from exactly `env` (validation errors raise)."""
    for name in [name for name in os.environ if name.startswith(PREFIX)]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return WorkerSettings()
