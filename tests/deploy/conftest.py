"""Fixtures for the deploy files' tests: the validators, installed on first use.

- `deploy_tool(name)`: path of helm, compose, hadolint or validators (the manifest validators'
  python), installed by deploy/tools/install.py the first time a session asks; a tool that
  cannot be obtained on this machine skips the test, saying why.
- `helm`: the chart rendered and linted by a real helm.
- `compose_config`: the compose file as docker compose resolves it.
"""

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.tooling import COMPOSE_FILE, DeployTool, Helm, install


@pytest.fixture(scope="session")
def deploy_tool() -> DeployTool:
    installed: dict[str, Path | str] = {}

    def get(name: str) -> Path:
        if name not in installed:
            installed[name] = install(name)
        found = installed[name]
        if isinstance(found, str):
            pytest.skip(found)
        return found

    return get


@pytest.fixture(scope="session")
def helm(deploy_tool: DeployTool) -> Helm:
    return Helm(deploy_tool("helm"))


@pytest.fixture(scope="session")
def compose_config(deploy_tool: DeployTool) -> dict[str, Any]:
    """Interpolated, merged, paths made absolute; no variable of this machine's environment
    leaks into the defaults."""
    binary = deploy_tool("compose")
    command = [str(binary), "-f", str(COMPOSE_FILE), "config", "--format", "json"]
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/")}
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=60, env=env, check=False
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)
