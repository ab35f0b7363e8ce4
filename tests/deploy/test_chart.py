"""deploy/k8s/voiceclone-worker: lints, renders manifests the API server and the CRDs accept,
and ties the pods to the worker's own settings (port, drain grace, group, topic, partitions).
"""

import math
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from consumer.settings import WorkerSettings
from tests.deploy.tooling import (
    CHART,
    KUBERNETES_VERSION,
    REPO_ROOT,
    TIMEOUT_WITH_INSTALL_S,
    DeployTool,
    Helm,
    Manifests,
    find,
)
from tests.deploy.worker_env import parse_settings

# The first test here may build helm (minutes, cold).
pytestmark = pytest.mark.timeout(TIMEOUT_WITH_INSTALL_S)

VALIDATOR = REPO_ROOT / "deploy" / "tools" / "validate_manifests.py"
ALERTS = REPO_ROOT / "deploy" / "prometheus" / "alerts.yml"
# Every optional part on: the TriggerAuthentication and the Secret's entries render too.
EVERYTHING = ["--set", "autoscaling.kafkaAuth.secretName=kafka-auth"]


def settings_of(manifests: Manifests, monkeypatch: pytest.MonkeyPatch) -> WorkerSettings:
    return parse_settings(find(manifests, "ConfigMap")["data"], monkeypatch)


def worker_container(manifests: Manifests) -> dict[str, Any]:
    return find(manifests, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def validate(validators_python: Path, rendered: str) -> subprocess.CompletedProcess[str]:
    command = [str(validators_python), str(VALIDATOR), "--kubernetes", KUBERNETES_VERSION]
    return subprocess.run(
        command, input=rendered, capture_output=True, text=True, timeout=120, check=False
    )


def test_chart_passes_helm_lint_strict(helm: Helm) -> None:
    result = helm.run("lint", "--strict", str(CHART), *EVERYTHING)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("options", [[], EVERYTHING], ids=["defaults", "everything"])
def test_manifests_pass_the_kubernetes_and_crd_schemas(
    helm: Helm, deploy_tool: DeployTool, options: list[str]
) -> None:
    result = validate(deploy_tool("validators"), helm.template(*options))
    assert result.returncode == 0, result.stdout + result.stderr
    kinds = set(re.findall(r"^valid (\w+) ", result.stdout, re.MULTILINE))
    assert {"Deployment", "ConfigMap", "Secret", "PodDisruptionBudget"} <= kinds
    assert {"Service", "ServiceMonitor", "ScaledObject"} <= kinds


def test_the_validator_rejects_unknown_fields(helm: Helm, deploy_tool: DeployTool) -> None:
    broken = (
        helm.template(*EVERYTHING)
        .replace("maxReplicaCount:", "maxReplicaCont:")  # a CRD (ScaledObject)
        .replace("readOnlyRootFilesystem:", "readOnlyRootFileSystem:")  # a built-in kind
    )
    result = validate(deploy_tool("validators"), broken)
    assert result.returncode == 1
    assert "INVALID ScaledObject" in result.stdout
    assert "spec.maxReplicaCont: unknown field" in result.stdout
    assert "INVALID Deployment" in result.stdout
    assert "'readOnlyRootFileSystem' was unexpected" in result.stdout


@pytest.mark.parametrize("grace", ["30", "90.5", "0"])
def test_termination_grace_covers_the_drain_plus_a_margin(
    helm: Helm, monkeypatch: pytest.MonkeyPatch, grace: str
) -> None:
    manifests = helm.render("--set-string", f"config.VOICECLONE_SHUTDOWN_GRACE_SECONDS={grace}")
    drain = settings_of(manifests, monkeypatch).shutdown_grace_seconds
    pod = find(manifests, "Deployment")["spec"]["template"]["spec"]
    margin = pod["terminationGracePeriodSeconds"] - math.ceil(drain)
    assert margin == 15  # values.yaml terminationMarginSeconds: closing after the drain


def test_probes_hit_the_workers_http_port(helm: Helm, monkeypatch: pytest.MonkeyPatch) -> None:
    manifests = helm.render("--set-string", "config.VOICECLONE_HTTP__PORT=9123")
    settings = settings_of(manifests, monkeypatch)
    container = worker_container(manifests)
    assert container["ports"] == [
        {"name": "http", "containerPort": settings.http.port, "protocol": "TCP"}
    ]
    assert settings.http.port == 9123
    probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe")}
    probes["readinessProbe"] = container["readinessProbe"]["httpGet"]
    assert probes == {
        "startupProbe": {"path": "/healthz", "port": "http"},
        "livenessProbe": {"path": "/healthz", "port": "http"},
        "readinessProbe": {"path": "/readyz", "port": "http"},
    }
    # /readyz asks the backend with its own time limit: the probe must wait longer.
    timeout = container["readinessProbe"]["timeoutSeconds"]
    assert timeout > settings.http.backend_check_timeout_seconds
    service_port = find(manifests, "Service")["spec"]["ports"][0]
    assert (service_port["port"], service_port["targetPort"]) == (9123, "http")


def test_the_pod_runs_unprivileged_with_settings_from_configmap_and_secret(helm: Helm) -> None:
    manifests = helm.render()
    pod = find(manifests, "Deployment")["spec"]["template"]["spec"]
    container = worker_container(manifests)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert set(container["resources"]["requests"]) == {"cpu", "memory"}
    assert "memory" in container["resources"]["limits"]
    refs = {kind: ref["name"] for source in container["envFrom"] for kind, ref in source.items()}
    configmap, secret = find(manifests, "ConfigMap"), find(manifests, "Secret")
    assert refs == {
        "configMapRef": configmap["metadata"]["name"],
        "secretRef": secret["metadata"]["name"],
    }


def test_an_existing_secret_replaces_the_charts(helm: Helm) -> None:
    manifests = helm.render("--set", "existingSecret=voiceclone-credentials")
    assert not [doc for doc in manifests if doc["kind"] == "Secret"]
    refs = [source.get("secretRef") for source in worker_container(manifests)["envFrom"]]
    assert {"name": "voiceclone-credentials"} in refs


def test_keda_scales_on_the_workers_group_lag_on_the_requests_topic(
    helm: Helm, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifests = helm.render(*EVERYTHING)
    settings = settings_of(manifests, monkeypatch)
    scaled = find(manifests, "ScaledObject")["spec"]
    deployment = find(manifests, "Deployment")
    assert scaled["scaleTargetRef"] == {"name": deployment["metadata"]["name"]}
    assert "replicas" not in deployment["spec"]  # KEDA owns the count
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "kafka"
    assert trigger["metadata"]["bootstrapServers"] == settings.kafka.bootstrap_servers
    assert trigger["metadata"]["consumerGroup"] == settings.group_id
    assert trigger["metadata"]["topic"] == settings.topics.requests
    assert scaled["maxReplicaCount"] == settings.kafka.topic_partitions
    auth = find(manifests, "TriggerAuthentication")
    assert trigger["authenticationRef"] == {"name": auth["metadata"]["name"]}


@pytest.mark.parametrize(("partitions", "asked", "cap"), [("6", 0, 6), ("12", 0, 12), ("6", 3, 3)])
def test_replicas_are_capped_at_the_partition_count(
    helm: Helm, partitions: str, asked: int, cap: int
) -> None:
    manifests = helm.render(
        "--set-string",
        f"config.VOICECLONE_KAFKA__TOPIC_PARTITIONS={partitions}",
        "--set",
        f"autoscaling.maxReplicas={asked}",
    )
    assert find(manifests, "ScaledObject")["spec"]["maxReplicaCount"] == cap


@pytest.mark.parametrize(
    "options",
    [
        ["--set", "autoscaling.maxReplicas=7"],
        ["--set", "autoscaling.enabled=false", "--set", "replicaCount=7"],
    ],
    ids=["keda", "fixed"],
)
def test_more_replicas_than_partitions_is_refused(helm: Helm, options: list[str]) -> None:
    result = helm.run("template", "vc", str(CHART), *options)
    assert result.returncode != 0
    assert "VOICECLONE_KAFKA__TOPIC_PARTITIONS" in result.stderr


def test_without_keda_the_deployment_keeps_its_replica_count(helm: Helm) -> None:
    manifests = helm.render("--set", "autoscaling.enabled=false", "--set", "replicaCount=3")
    assert find(manifests, "Deployment")["spec"]["replicas"] == 3
    assert not [doc for doc in manifests if doc["kind"] == "ScaledObject"]


@pytest.mark.parametrize(
    ("option", "complaint"),
    [
        ("config.VOICECLONE_MAX_IN_FLIGHT=8", "got number, want string"),  # quote numbers
        ("config.GROUP_ID=x", "'GROUP_ID' does not match pattern"),  # not a worker setting
        ("secrets.AWS_ACCESS_KEY_ID=x", "'AWS_ACCESS_KEY_ID' does not match pattern"),
    ],
)
def test_values_outside_the_schema_are_refused(helm: Helm, option: str, complaint: str) -> None:
    result = helm.run("template", "vc", str(CHART), "--set", option)
    assert result.returncode != 0
    assert complaint in result.stderr


def test_pdb_and_service_monitor_select_the_worker_pods(helm: Helm) -> None:
    manifests = helm.render()
    pod_labels = find(manifests, "Deployment")["spec"]["template"]["metadata"]["labels"]
    pdb = find(manifests, "PodDisruptionBudget")["spec"]
    assert pdb["maxUnavailable"] == 1
    assert pdb["selector"]["matchLabels"].items() <= pod_labels.items()
    service = find(manifests, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    monitor = find(manifests, "ServiceMonitor")["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert monitor["endpoints"][0]["path"] == "/metrics"


def test_scraped_job_name_is_the_one_the_alert_rules_select(helm: Helm) -> None:
    manifests = helm.render()
    monitor = find(manifests, "ServiceMonitor")["spec"]
    job = find(manifests, "Service")["metadata"]["labels"][monitor["jobLabel"]]
    assert set(re.findall(r'job="([^"]+)"', ALERTS.read_text())) == {job}
