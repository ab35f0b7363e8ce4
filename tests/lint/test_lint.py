"""`make lint`'s checkers beyond ruff: the import contracts hold on the tree and catch an import
against them (a layer skipped upwards, the codecs' old cycle), and pyright runs from the
environment `make setup` makes, with nothing to download first."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PACKAGES = ("consumer", "producer", "schemas", "modal_app", "bench")


def lint_imports(project: Path) -> subprocess.CompletedProcess[str]:
    """`lint-imports` on `project`'s packages, with its pyproject's contracts."""
    return subprocess.run(
        [str(BIN / "lint-imports"), "--no-cache"],
        cwd=project,
        # The packages of `project`, not the installed ones of this checkout.
        env=os.environ | {"PYTHONPATH": str(project)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_tree_keeps_its_import_contracts() -> None:
    done = lint_imports(ROOT)

    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def test_an_import_against_the_contracts_fails_the_lint(tmp_path: Path) -> None:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package)
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with (tmp_path / "producer" / "admin.py").open("a") as module:
        module.write("\nfrom consumer.settings import WorkerSettings  # noqa\n")
    with (tmp_path / "schemas" / "codec.py").open("a") as module:
        module.write("\nfrom schemas.registry import RegistryCodec  # noqa\n")

    done = lint_imports(tmp_path)

    assert done.returncode != 0
    assert "producer.admin -> consumer.settings" in done.stdout
    assert "schemas.codec -> schemas.registry" in done.stdout


def test_pyright_runs_with_nothing_to_download(tmp_path: Path) -> None:
    # An empty home: no cached node runtime or pyright package to fall back on.
    home = {"HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    done = subprocess.run(
        [str(BIN / "pyright"), "--version"],
        env=os.environ | home,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("pyright 1.1.414")
    assert list(tmp_path.iterdir()) == []  # nothing fetched into the cache
