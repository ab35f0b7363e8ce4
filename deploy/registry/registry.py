#!/usr/bin/env python3
"""A local Apicurio Registry (Confluent-compatible API) for dev and tests.

The runnable Quarkus app comes from Maven Central (`io.apicurio:apicurio-registry-app`,
classifier `all`, type `tar.gz`, fetched by `mvn dependency:copy` so it is cached in ~/.m2 too)
and runs on the system's Java 17+. The app, logs, pid and state files all live in one cache dir:
$VOICECLONE_REGISTRY_HOME, default <repo>/.cache/registry.

    registry.py fetch   # download and unpack the app once (marker: app/.registry-version)
    registry.py start   # idempotent; the last stdout line is url=http://127.0.0.1:PORT/apis/ccompat/v7
    registry.py status  # exit 0 running, 1 running but not answering, 3 stopped
    registry.py url     # just the URL (exit 3 when stopped)
    registry.py stop    # SIGTERM, then SIGKILL after --timeout

Storage is in memory: a restart forgets every schema. `start --persist` keeps them in an H2
file under <home>/data instead, so the registry comes back with the same ids (as a production
registry does after an outage).

Standard library only (the scaffolding it shares with the Kafka broker: deploy/jvm_service.py),
so it runs with any python3 >= 3.9, inside or outside the project venv.
"""

from __future__ import annotations

import argparse
import os
import sys
import tarfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))  # deploy/: the shared jvm_service module
from jvm_service import (  # noqa: E402
    EXIT_FAIL,
    EXIT_OK,
    EXIT_STOPPED,
    HOST,
    CacheDir,
    JvmService,
    ServiceError,
    add_common_arguments,
    await_answer,
    choose_port,
    daemonise,
    env_int,
    fetch_with_maven,
    file_size,
    find_java,
    home_flag,
    locked,
    read_state,
    reuse_running,
    run,
    running_pid,
    terminate,
    write_state,
)

DEFAULT_HOME = HERE.parent.parent / ".cache" / "registry"
GROUP, ARTIFACT = "io.apicurio", "apicurio-registry-app"
DEFAULT_VERSION = "2.6.13.Final"  # the last 2.x: 3.x needs Java 21
CCOMPAT_PATH = "/apis/ccompat/v7"
# C1-only JIT: the registry answers ~25% sooner on small machines and serves tests at ease.
DEFAULT_JVM_OPTS = "-Xms64m -Xmx384m -XX:TieredStopAtLevel=1"


@dataclass(frozen=True)
class State:
    """What the last start chose; kept after stop so a restart takes the same port."""

    pid: int
    port: int
    version: str
    persist: bool = False

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}{CCOMPAT_PATH}"


REGISTRY = JvmService(
    name="registry",
    noun="registry",
    pid_file="registry.pid",
    java_hint="Apicurio Registry 2.x needs Java 17+",
    state_type=State,
    answers=lambda state: answers(state.url),
)
info = REGISTRY.info


@dataclass(frozen=True)
class Layout(CacheDir):
    """Every path the manager uses, all under one cache dir."""

    SERVICE = REGISTRY

    @property
    def app(self) -> Path:
        return self.home / "app"

    @property
    def marker(self) -> Path:
        return self.app / ".registry-version"

    def runner_jar(self, version: str) -> Path:
        return self.app / f"{ARTIFACT}-{version}-runner.jar"

    @property
    def data(self) -> Path:
        return self.home / "data"

    @property
    def log(self) -> Path:
        return self.home / "logs" / "registry.log"


def registry_version() -> str:
    return os.environ.get("VOICECLONE_REGISTRY_VERSION", "").strip() or DEFAULT_VERSION


# --- fetching the app ----------------------------------------------------------------------------


def fetch(layout: Layout, version: str) -> None:
    """Download the app's tar.gz from Maven Central and unpack it into app/, unless there."""
    started = time.monotonic()

    def unpack(staging: Path) -> None:
        archive = staging / f"{ARTIFACT}-{version}-all.tar.gz"
        with tarfile.open(archive) as tar:
            # The archive holds the runner jar, lib/ and meta/ at its top level. The "data"
            # filter (refusing paths outside staging) exists from Python 3.12 and in patched
            # 3.9-3.11.
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(staging, **safe)
        archive.unlink()
        if not (staging / f"{ARTIFACT}-{version}-runner.jar").is_file():
            raise ServiceError(f"{archive.name} holds no {ARTIFACT}-{version}-runner.jar")

    # dependency:copy's coordinates are groupId:artifactId:version:type:classifier.
    copy = "org.apache.maven.plugins:maven-dependency-plugin:3.11.0:copy"
    artifact = f"-Dartifact={GROUP}:{ARTIFACT}:{version}:tar.gz:all"
    if fetch_with_maven(
        REGISTRY,
        layout.app,
        layout.marker,
        version,
        f"Apicurio Registry {version}",
        lambda staging: [copy, artifact, f"-DoutputDirectory={staging}"],
        cwd=layout.home,
        unpack=unpack,
    ):
        info(f"fetched and unpacked in {time.monotonic() - started:.1f}s into {layout.app}")


def answers(url: str) -> bool:
    """Readiness: the Confluent-compatible API lists its subjects."""
    try:
        with urllib.request.urlopen(f"{url}/subjects", timeout=2) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError, ValueError):
        return False


# --- commands ------------------------------------------------------------------------------------


def launch(layout: Layout, args: argparse.Namespace, version: str) -> State:
    """Daemonise a new registry and wait until its ccompat API answers."""
    java = find_java(REGISTRY)
    previous = read_state(layout)
    port = choose_port(args.port, previous.port if previous else None, "HTTP")
    layout.log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if args.persist:
        layout.data.mkdir(parents=True, exist_ok=True)
        env["REGISTRY_DATASOURCE_URL"] = f"jdbc:h2:file:{layout.data / 'registry'}"
    else:
        env.pop("REGISTRY_DATASOURCE_URL", None)  # the app's default: H2 in memory
    jvm_opts = os.environ.get("VOICECLONE_REGISTRY_JVM_OPTS", DEFAULT_JVM_OPTS).split()
    cmd = [java, *jvm_opts, home_flag(layout), f"-Dquarkus.http.host={HOST}"]
    cmd += [f"-Dquarkus.http.port={port}", "-jar", str(layout.runner_jar(version))]
    started = time.monotonic()
    offset = file_size(layout.log)
    proc = daemonise(layout, cmd, layout.log, "ab", env)
    state = State(proc.pid, port, version, args.persist)
    write_state(layout, state)  # Before waiting, so `stop` can find a registry that hangs.
    await_answer(layout, proc, state, state.url, args.timeout, [(layout.log, offset)])
    info(f"registry ready in {time.monotonic() - started:.1f}s (pid {proc.pid}, {version})")
    return state


def cmd_fetch(layout: Layout, args: argparse.Namespace) -> int:
    with locked(layout):
        fetch(layout, registry_version())
    info(f"app in {layout.app}")
    return EXIT_OK


def cmd_start(layout: Layout, args: argparse.Namespace) -> int:
    with locked(layout):
        state = reuse_running(layout, args.timeout)
        if state is not None and state.persist != args.persist:
            raise ServiceError(
                f"the running registry has {'file' if state.persist else 'memory'} storage; "
                "run `stop` first"
            )
        if state is None:
            version = registry_version()
            fetch(layout, version)
            state = launch(layout, args, version)
    print(state.url if args.quiet else f"url={state.url}")
    return EXIT_OK


def cmd_stop(layout: Layout, args: argparse.Namespace) -> int:
    with locked(layout):
        pid = running_pid(layout)
        if pid is None:
            info("not running")
            return EXIT_OK
        started = time.monotonic()
        terminate(pid, layout, args.timeout)
    info(f"stopped pid {pid} in {time.monotonic() - started:.1f}s")
    return EXIT_OK


def cmd_status(layout: Layout, args: argparse.Namespace) -> int:
    pid = running_pid(layout)
    state = read_state(layout)
    if pid is None or state is None:
        print("stopped")
        return EXIT_STOPPED
    if not answers(state.url):
        print(f"running pid={pid} but not answering on {state.url}")
        return EXIT_FAIL
    print(f"running pid={pid} url={state.url} version={state.version}")
    return EXIT_OK


def cmd_url(layout: Layout, args: argparse.Namespace) -> int:
    state = read_state(layout)
    if running_pid(layout) is None or state is None:
        info("not running")
        return EXIT_STOPPED
    print(state.url)
    return EXIT_OK


COMMANDS = {
    "fetch": cmd_fetch,
    "start": cmd_start,
    "stop": cmd_stop,
    "status": cmd_status,
    "url": cmd_url,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(
        parser,
        COMMANDS,
        home=Path(os.environ.get("VOICECLONE_REGISTRY_HOME") or DEFAULT_HOME),
        home_help="cache dir for the app, logs, state (env VOICECLONE_REGISTRY_HOME)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=env_int("VOICECLONE_REGISTRY_PORT"),
        help="HTTP port; 0 = any free port (env VOICECLONE_REGISTRY_PORT; default: the last one "
        "if free, else any free port)",
    )
    parser.add_argument(
        "--persist",
        action="store_true",
        help="start: keep schemas in an H2 file under <home>/data across restarts (default: "
        "in memory, gone at stop)",
    )
    parser.add_argument(
        "--quiet", "-q", action="store_true", help="start: print only the URL, no progress"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return run(Layout, COMMANDS, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
