"""The Dockerfile: hadolint-clean, a small default target without the engine extra, an engine
target with it, both unprivileged; and a build context (.dockerignore) that holds exactly the
packages the project's wheel is built from. No Docker engine here: the build itself is not run.
"""

import re
import subprocess
import tomllib
from dataclasses import dataclass, field

from consumer.settings import WorkerSettings
from tests.deploy.tooling import REPO_ROOT, DeployTool

DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, instruction: str) -> list[str]:
        return [args for name, args in self.instructions if name == instruction]


def stages() -> dict[str, Stage]:
    """The Dockerfile's stages in order, each with its (INSTRUCTION, arguments) pairs."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())  # join continued lines
    found: dict[str, Stage] = {}
    current: Stage | None = None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        instruction, _, args = line.strip().partition(" ")
        if instruction == "FROM":
            base, _, name = args.partition(" AS ")
            current = found.setdefault(name, Stage(name, base))
        elif current is not None:
            current.instructions.append((instruction, " ".join(args.split())))
    return found


def test_dockerfile_passes_hadolint(deploy_tool: DeployTool) -> None:
    hadolint = deploy_tool("hadolint")
    result = subprocess.run(
        [str(hadolint), str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_default_target_is_the_worker_without_the_engine_extra() -> None:
    found = stages()
    assert list(found)[-1] == "worker"  # `docker build .` builds the last stage
    engine_installs = {
        name
        for name, stage in found.items()
        for run in stage.args("RUN")
        if "uv sync" in run and "--extra engine" in run
    }
    assert engine_installs == {"build-engine"}
    assert found["worker"].args("COPY") == ["--from=build /app/.venv /app/.venv"]
    assert found["engine"].args("COPY") == ["--from=build-engine /app/.venv /app/.venv"]
    assert found["build-engine"].base == "build"


def test_every_install_is_from_the_lockfile_without_dev_or_editable() -> None:
    syncs = [run for stage in stages().values() for run in stage.args("RUN") if "uv sync" in run]
    assert len(syncs) == 3
    for run in syncs:
        assert "--frozen" in run
        assert "--no-editable" in run
        assert "--extra dev" not in run
        assert "--all-extras" not in run


def test_both_targets_run_unprivileged_and_serve_the_worker() -> None:
    found = stages()
    for target in ("worker", "engine"):
        assert found[target].args("USER") == ["10001"], target
    runtime = found["runtime"]
    assert runtime.args("ENTRYPOINT") == ['["voiceclone"]']
    assert runtime.args("CMD") == ['["worker"]']
    assert PYPROJECT["project"]["scripts"]["voiceclone"] == "consumer.cli:main"
    assert runtime.args("EXPOSE") == [str(WorkerSettings().http.port)]


def test_the_build_context_holds_exactly_what_the_image_copies() -> None:
    lines = [line for line in DOCKERIGNORE.read_text().splitlines() if line.strip()]
    rules = [line for line in lines if not line.startswith("#")]
    assert rules[0] == "*"  # an allow-list: .venv, .cache, .git and tests stay out
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    packages = set(PYPROJECT["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"])
    assert allowed == packages | {"pyproject.toml", "uv.lock", "README.md"}
    copied = {
        source
        for stage in stages().values()
        for copy in stage.args("COPY")
        if not copy.startswith("--from")
        for source in copy.split()[:-1]
    }
    assert copied == allowed
