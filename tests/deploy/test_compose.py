"""deploy/compose/compose.yaml: valid for docker compose, started in order, and every file it
mounts is where it says, so Prometheus loads our rules and Grafana our dashboard.

No Docker engine here: `docker compose config` (the real compose binary) checks the file, and
the tests read what it resolved.
"""

import posixpath
import re
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from tests.deploy.tooling import REPO_ROOT
from tests.fixtures.prometheus import PrometheusTools

Service = dict[str, Any]
COMPOSE_PROMETHEUS = REPO_ROOT / "deploy" / "compose" / "prometheus.yml"
ALERTS = REPO_ROOT / "deploy" / "prometheus" / "alerts.yml"


def host_path(service: Service, inside: str) -> Path:
    """The repository file behind a path inside the service's container (its bind mounts)."""
    path = PurePosixPath(posixpath.normpath(inside))  # as Prometheus and Grafana clean it
    binds = [m for m in service.get("volumes", []) if m["type"] == "bind"]
    for mount in sorted(binds, key=lambda m: len(m["target"]), reverse=True):
        target = PurePosixPath(mount["target"])
        if path == target or target in path.parents:
            return Path(mount["source"]) / path.relative_to(target)
    raise AssertionError(f"{inside} is not mounted into the container")


def option(service: Service, name: str) -> str:
    (value,) = [arg.split("=", 1)[1] for arg in service["command"] if arg.startswith(f"{name}=")]
    return value


def seconds(duration: str) -> float:
    """A compose duration ("45s", "1m30s") in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert "".join(number + unit for number, unit in parts) == duration, duration
    return sum(float(number) * units[unit] for number, unit in parts)


def test_the_stack_has_every_part(compose_config: dict[str, Any]) -> None:
    assert set(compose_config["services"]) == {
        "kafka",
        "schema-registry",
        "minio",
        "minio-init",
        "topics",
        "schemas",
        "worker",
        "prometheus",
        "grafana",
    }
    assert compose_config["services"]["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == (
        "broker,controller"  # KRaft: no ZooKeeper
    )


def test_topics_are_created_before_the_worker_starts(compose_config: dict[str, Any]) -> None:
    services = compose_config["services"]
    assert services["topics"]["command"] == ["topics", "create"]
    assert services["worker"]["command"] == ["worker"]
    assert services["topics"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    worker_needs = {
        name: dep["condition"] for name, dep in services["worker"]["depends_on"].items()
    }
    assert worker_needs == {
        "topics": "service_completed_successfully",
        "schemas": "service_completed_successfully",
        "minio-init": "service_completed_successfully",
    }


def test_the_worker_runs_in_registry_mode_on_registered_schemas(
    compose_config: dict[str, Any],
) -> None:
    services = compose_config["services"]
    assert services["schemas"]["command"] == ["schemas", "register"]
    assert services["schemas"]["depends_on"]["schema-registry"]["condition"] == "service_healthy"
    url = "http://schema-registry:8080/apis/ccompat/v7"
    for name in ("schemas", "worker"):
        assert services[name]["environment"]["VOICECLONE_SCHEMA_REGISTRY_URL"] == url
    assert services["schema-registry"]["image"].endswith(":2.6.13.Final")


def test_every_bind_mount_exists_in_the_repository(compose_config: dict[str, Any]) -> None:
    for name, service in compose_config["services"].items():
        for mount in service.get("volumes", []):
            if mount["type"] == "bind":
                source = Path(mount["source"])
                assert source.exists(), f"{name}: {source}"
                assert REPO_ROOT in source.parents, f"{name}: {source} is outside the repository"


def test_the_worker_drains_before_compose_kills_it(compose_config: dict[str, Any]) -> None:
    worker = compose_config["services"]["worker"]
    drain = float(worker["environment"]["VOICECLONE_SHUTDOWN_GRACE_SECONDS"])
    assert seconds(worker["stop_grace_period"]) >= drain + 10


def test_worker_port_healthcheck_and_scrape_use_its_http_port(
    compose_config: dict[str, Any],
) -> None:
    worker = compose_config["services"]["worker"]
    port = int(worker["environment"]["VOICECLONE_HTTP__PORT"])
    assert [p["target"] for p in worker["ports"]] == [port]
    assert f"127.0.0.1:{port}/healthz" in " ".join(worker["healthcheck"]["test"])
    (scrape,) = yaml.safe_load(COMPOSE_PROMETHEUS.read_text())["scrape_configs"]
    assert scrape["dns_sd_configs"] == [
        {"names": ["worker"], "type": "A", "port": port, "refresh_interval": "15s"}
    ]


def test_prometheus_loads_this_config_and_the_alert_rules(compose_config: dict[str, Any]) -> None:
    prometheus = compose_config["services"]["prometheus"]
    config_inside = option(prometheus, "--config.file")
    assert host_path(prometheus, config_inside) == COMPOSE_PROMETHEUS
    config = yaml.safe_load(COMPOSE_PROMETHEUS.read_text())
    # Relative rule files resolve against the config file's folder, inside the container.
    rules = [
        host_path(prometheus, str(PurePosixPath(config_inside).parent / rule))
        for rule in config["rule_files"]
    ]
    assert rules == [ALERTS]
    jobs = {scrape["job_name"] for scrape in config["scrape_configs"]}
    assert jobs == set(re.findall(r'job="([^"]+)"', ALERTS.read_text()))


def test_compose_prometheus_config_passes_promtool(prometheus_tools: PrometheusTools) -> None:
    result = prometheus_tools.promtool_run("check", "config", str(COMPOSE_PROMETHEUS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr
    assert "alerts.yml" in result.stdout + result.stderr  # the rules were checked too


def test_grafana_is_provisioned_with_the_dashboard(compose_config: dict[str, Any]) -> None:
    grafana = compose_config["services"]["grafana"]
    provisioning = host_path(grafana, "/etc/grafana/provisioning")
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())[
        "datasources"
    ]
    assert datasource["url"] == "http://prometheus:9090"  # the compose service
    providers = [
        provider
        for file in sorted((provisioning / "dashboards").glob("*.yaml"))
        for provider in yaml.safe_load(file.read_text())["providers"]
    ]
    dashboards = [host_path(grafana, p["options"]["path"]) for p in providers]
    assert [sorted(d.glob("*.json")) for d in dashboards] != [[]]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert host_path(grafana, home).is_file()
