"""The chart and the compose file set only settings the worker reads, with values it accepts.

Names are held to WorkerSettings (walked field by field, nested groups joined by `__`) and the
worker command's own variables; values are parsed by WorkerSettings itself, as at start.
"""

from typing import Any

import pytest
import yaml

from tests.deploy.tooling import CHART, COMPOSE_FILE, TIMEOUT_WITH_INSTALL_S, Helm, find
from tests.deploy.worker_env import (
    environment_names,
    parse_settings,
    unread_variables,
    worker_env_names,
)

# A test here may be the first to need helm, and build it (minutes, cold).
pytestmark = pytest.mark.timeout(TIMEOUT_WITH_INSTALL_S)

HOST_ENV = COMPOSE_FILE.parent / "host.env"


def values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def worker_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run our image: those built from the repository's Dockerfile."""
    return {name: svc for name, svc in compose["services"].items() if "build" in svc}


def every_secret_set() -> list[str]:
    """`--set` flags giving every credential in values.yaml a value, so each is rendered."""
    return [arg for name in values()["secrets"] for arg in ("--set", f"secrets.{name}=x")]


def rendered_env(helm: Helm) -> dict[str, str]:
    """What the worker container's environment holds: ConfigMap, Secret and `env` entries."""
    manifests = helm.render(*every_secret_set())
    container = find(manifests, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {item["name"]: item.get("value", "") for item in container.get("env", [])}
    return {
        **find(manifests, "ConfigMap")["data"],
        **find(manifests, "Secret")["stringData"],
        **env,
    }


def test_the_walk_finds_nested_settings_and_nothing_else() -> None:
    names = worker_env_names()
    assert "VOICECLONE_KAFKA__BOOTSTRAP_SERVERS" in names
    assert "VOICECLONE_BACKEND__MODAL__APP_1_7B" in names  # two groups deep
    assert "VOICECLONE_HTTP__PORT" in names
    assert {"VOICECLONE_LOG_FORMAT", "VOICECLONE_LOG_LEVEL"} <= names
    assert "VOICECLONE_KAFKA" not in names  # a group is not a leaf setting
    typos = [
        "VOICECLONE_KAFKA__BOOTSTRAP_SERVER",
        "VOICECLONE_KAFKA_BOOTSTRAP_SERVERS",
        "KAFKA__BOOTSTRAP_SERVERS",
        "MODAL_TOKEN",
    ]
    assert unread_variables([*typos, "MODAL_TOKEN_ID", "VOICECLONE_GROUP_ID"]) == sorted(typos)


def test_compose_sets_only_variables_the_worker_reads() -> None:
    services = worker_services(yaml.safe_load(COMPOSE_FILE.read_text()))
    assert set(services) == {"schemas", "topics", "worker"}
    for name, service in services.items():
        assert unread_variables(environment_names(service.get("environment"))) == [], name


def test_compose_values_are_valid_settings(
    compose_config: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = compose_config["services"]["worker"]
    settings = parse_settings(worker["environment"], monkeypatch)
    assert settings.kafka.bootstrap_servers == "kafka:9092"
    assert settings.storage.kind == "s3"
    assert settings.storage.endpoint_url == "http://minio:9000"


def test_chart_values_set_only_variables_the_worker_reads() -> None:
    chart_values = values()
    assert unread_variables(chart_values["config"]) == []
    assert unread_variables(chart_values["secrets"]) == []


def test_rendered_chart_sets_only_variables_the_worker_reads(helm: Helm) -> None:
    env = rendered_env(helm)
    assert set(values()["secrets"]) <= set(env)  # every credential reached the container
    assert unread_variables(env) == []


def test_rendered_chart_values_are_valid_settings(
    helm: Helm, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = parse_settings(rendered_env(helm), monkeypatch)
    assert settings.storage.kind == "s3"
    assert settings.http.host == "0.0.0.0"  # probes and scrapes come from outside the pod


def host_env() -> dict[str, str]:
    lines = HOST_ENV.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


def published(service: dict[str, Any], target: int) -> str:
    (port,) = [p for p in service["ports"] if p["target"] == target]
    return f"{port['host_ip']}:{port['published']}"


def test_host_env_reaches_the_stack_the_worker_writes_to(
    compose_config: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = host_env()
    assert unread_variables(env) == []
    client = parse_settings(env, monkeypatch)
    services = compose_config["services"]
    worker = services["worker"]["environment"]
    for name in ("BUCKET", "ACCESS_KEY_ID", "SECRET_ACCESS_KEY", "PUBLIC_BASE_URL"):
        assert env[f"VOICECLONE_STORAGE__{name}"] == worker[f"VOICECLONE_STORAGE__{name}"], name
    assert client.kafka.bootstrap_servers == published(services["kafka"], 29092)
    assert client.storage.endpoint_url == f"http://{published(services['minio'], 9000)}"
