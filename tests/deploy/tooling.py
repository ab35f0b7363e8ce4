"""Paths of the deploy files, the validators' installer, and helm as the tests drive it.

`install(name)` runs `deploy/tools/install.py NAME` (pinned, cached under .cache/tools, so only
the first session on a machine pays) and gives the tool's path, or, when the tool cannot be
obtained on this machine (exit 3: no Go toolchain, no binary for this platform), the reason,
which the fixtures turn into a skip. Any other install failure fails the test.
"""

import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
INSTALLER = REPO_ROOT / "deploy" / "tools" / "install.py"
CHART = REPO_ROOT / "deploy" / "k8s" / "voiceclone-worker"
COMPOSE_FILE = REPO_ROOT / "deploy" / "compose" / "compose.yaml"
# A cold helm build takes minutes on 2 cores: modules that use helm allow for it.
INSTALL_TIMEOUT_S = 900
TIMEOUT_WITH_INSTALL_S = INSTALL_TIMEOUT_S + 300
EXIT_UNAVAILABLE = 3
RELEASE = "vc"
# The Kubernetes release the chart is rendered and validated for.
KUBERNETES_VERSION = "1.33.0"

Manifests = list[dict[str, Any]]
DeployTool = Callable[[str], Path]  # the `deploy_tool` fixture: tool name -> path


def install(name: str) -> Path | str:
    """The tool's path, or why it cannot be had here (a skip reason)."""
    result = subprocess.run(
        [sys.executable, str(INSTALLER), name],
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_S,
        check=False,
    )
    if result.returncode == EXIT_UNAVAILABLE:
        return result.stderr.strip().splitlines()[-1]
    if result.returncode != 0:
        pytest.fail(f"{INSTALLER} {name} failed:\n{result.stderr[-4000:]}", pytrace=False)
    _, _, path = result.stdout.strip().splitlines()[-1].partition("=")
    return Path(path)


@dataclass(frozen=True)
class Helm:
    binary: Path

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = [str(self.binary), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)

    def template(self, *args: str) -> str:
        """`helm template` of the chart; fails the test with helm's message if it refuses."""
        result = self.run(
            "template", RELEASE, str(CHART), "--kube-version", KUBERNETES_VERSION, *args
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    def render(self, *args: str) -> Manifests:
        return [doc for doc in yaml.safe_load_all(self.template(*args)) if doc]


def find(manifests: Manifests, kind: str) -> dict[str, Any]:
    """The one manifest of `kind`."""
    found = [doc for doc in manifests if doc["kind"] == kind]
    assert len(found) == 1, f"{len(found)} manifests of kind {kind}"
    return found[0]
