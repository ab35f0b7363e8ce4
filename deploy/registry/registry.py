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

Standard library only, so it runs with any python3 >= 3.9, inside or outside the project venv.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_HOME = HERE.parent.parent / ".cache" / "registry"
HOST = "127.0.0.1"
GROUP, ARTIFACT = "io.apicurio", "apicurio-registry-app"
DEFAULT_VERSION = "2.6.13.Final"  # the last 2.x: 3.x needs Java 21
CCOMPAT_PATH = "/apis/ccompat/v7"
# C1-only JIT: the registry answers ~25% sooner on small machines and serves tests at ease.
DEFAULT_JVM_OPTS = "-Xms64m -Xmx384m -XX:TieredStopAtLevel=1"

EXIT_OK, EXIT_FAIL, EXIT_STOPPED = 0, 1, 3


class RegistryError(Exception):
    """A failure worth a one-line message (and maybe a log tail), not a traceback."""


@dataclass(frozen=True)
class Layout:
    """Every path the manager uses, all under one cache dir."""

    home: Path

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

    @property
    def pid_file(self) -> Path:
        return self.home / "registry.pid"

    @property
    def state_file(self) -> Path:
        return self.home / "state.json"

    @property
    def lock_file(self) -> Path:
        return self.home / ".lock"


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


_quiet = False


def info(message: str) -> None:
    if not _quiet:
        print(f"[registry] {message}", file=sys.stderr, flush=True)


def env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    return int(value) if value else None


def registry_version() -> str:
    return os.environ.get("VOICECLONE_REGISTRY_VERSION", "").strip() or DEFAULT_VERSION


def require_tool(name: str, hint: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RegistryError(f"'{name}' not found on PATH ({hint})")
    return path


def find_java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").is_file():
        return str(Path(java_home) / "bin" / "java")
    return require_tool("java", "Apicurio Registry 2.x needs Java 17+")


def read_state(layout: Layout) -> State | None:
    try:
        return State(**json.loads(layout.state_file.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def write_state(layout: Layout, state: State) -> None:
    tmp = layout.state_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(state.__dict__, indent=2) + "\n")
    tmp.replace(layout.state_file)
    layout.pid_file.write_text(f"{state.pid}\n")


@contextlib.contextmanager
def locked(layout: Layout) -> Iterator[None]:
    """Serialise start/stop/fetch on one cache dir (e.g. parallel pytest sessions)."""
    layout.home.mkdir(parents=True, exist_ok=True)
    with open(layout.lock_file, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


# --- fetching the app ----------------------------------------------------------------------------


def fetch(layout: Layout, version: str) -> None:
    """Download the app's tar.gz from Maven Central and unpack it into app/, unless there."""
    if layout.marker.is_file() and layout.marker.read_text().strip() == version:
        return
    mvn = require_tool("mvn", "Maven fetches the registry from Maven Central")
    staging = layout.home / f"app.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    info(f"fetching Apicurio Registry {version} from Maven Central ...")
    started = time.monotonic()
    # dependency:copy's coordinates are groupId:artifactId:version:type:classifier.
    cmd = [mvn, "-q", "-B", "org.apache.maven.plugins:maven-dependency-plugin:3.11.0:copy"]
    cmd += [f"-Dartifact={GROUP}:{ARTIFACT}:{version}:tar.gz:all", f"-DoutputDirectory={staging}"]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=layout.home)
    if result.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise RegistryError(f"mvn failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    archive = staging / f"{ARTIFACT}-{version}-all.tar.gz"
    with tarfile.open(archive) as tar:
        # The archive holds the runner jar, lib/ and meta/ at its top level. The "data" filter
        # (refusing paths outside staging) exists from Python 3.12 and in patched 3.9-3.11.
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(staging, **safe)
    archive.unlink()
    if not (staging / f"{ARTIFACT}-{version}-runner.jar").is_file():
        shutil.rmtree(staging, ignore_errors=True)
        raise RegistryError(f"{archive.name} holds no {ARTIFACT}-{version}-runner.jar")
    # Swap in whole so an interrupted fetch never leaves a half-filled app/ behind a marker.
    shutil.rmtree(layout.app, ignore_errors=True)
    staging.rename(layout.app)
    layout.marker.write_text(f"{version}\n")
    info(f"fetched and unpacked in {time.monotonic() - started:.1f}s into {layout.app}")


# --- processes -----------------------------------------------------------------------------------


def process_cmdline(pid: int) -> str:
    """The command line of a live process, '' if gone (zombies have an empty cmdline too)."""
    if Path("/proc/self/cmdline").exists():
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            return ""
    ps = ["ps", "-o", "command=", "-p", str(pid)]  # macOS and other /proc-less systems
    return subprocess.run(ps, capture_output=True, text=True, check=False).stdout.strip()


def home_flag(layout: Layout) -> str:
    """Tags the JVM's command line so we only ever signal a registry from *this* cache dir."""
    return f"-Dvoiceclone.registry.home={layout.home}"


def running_pid(layout: Layout) -> int | None:
    """The pid of this cache dir's registry if it is alive; drops a stale pid file."""
    try:
        pid = int(layout.pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    if home_flag(layout) in process_cmdline(pid):
        return pid
    layout.pid_file.unlink(missing_ok=True)
    return None


def wait_for_exit(pid: int, layout: Layout, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if home_flag(layout) not in process_cmdline(pid):
            return True
        time.sleep(0.1)
    return False


def terminate(pid: int, layout: Layout, timeout: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not wait_for_exit(pid, layout, timeout):
        info(f"pid {pid} ignored SIGTERM for {timeout:.0f}s; sending SIGKILL")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if not wait_for_exit(pid, layout, 10):
            raise RegistryError(f"pid {pid} survived SIGKILL")
    layout.pid_file.unlink(missing_ok=True)


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        # As the JVM binds: a port whose old connections linger in TIME_WAIT is free to take.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def choose_port(explicit: int | None, preferred: int | None) -> int:
    """explicit (0 = any free port; must be free) > preferred if free > any free port."""
    if explicit:
        if not port_is_free(explicit):
            raise RegistryError(f"port {explicit} on {HOST} is already in use")
        return explicit
    if explicit is None and preferred and port_is_free(preferred):
        return preferred
    return free_port()


def answers(url: str) -> bool:
    """Readiness: the Confluent-compatible API lists its subjects."""
    try:
        with urllib.request.urlopen(f"{url}/subjects", timeout=2) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError, ValueError):
        return False


def log_tail(layout: Layout, offset: int, lines: int = 40) -> str:
    with contextlib.suppress(OSError), open(layout.log, "rb") as handle:
        handle.seek(offset)
        tail = handle.read().decode(errors="replace").splitlines()[-lines:]
        if tail:
            return f"--- {layout.log} (last {len(tail)} lines) ---\n" + "\n".join(tail)
    return "(the registry logged nothing)"


# --- commands ------------------------------------------------------------------------------------


def launch(layout: Layout, args: argparse.Namespace, version: str) -> State:
    """Daemonise a new registry and wait until its ccompat API answers."""
    java = find_java()
    previous = read_state(layout)
    port = choose_port(args.port, previous.port if previous else None)
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
    offset = layout.log.stat().st_size if layout.log.is_file() else 0
    with open(layout.log, "ab") as out:
        # A new session: no controlling terminal, no SIGINT/SIGHUP from the starter's shell.
        proc = subprocess.Popen(
            cmd,
            cwd=layout.home,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    state = State(proc.pid, port, version, args.persist)
    write_state(layout, state)  # Before waiting, so `stop` can find a registry that hangs.
    deadline = started + args.timeout
    while not answers(state.url):
        failure = None
        if proc.poll() is not None:
            failure = f"registry exited with code {proc.returncode} during startup"
        elif time.monotonic() > deadline:
            failure = f"registry did not answer on {state.url} within {args.timeout:.0f}s"
        if failure:
            terminate(proc.pid, layout, 10)
            raise RegistryError(f"{failure}\n{log_tail(layout, offset)}")
        time.sleep(0.1)
    info(f"registry ready in {time.monotonic() - started:.1f}s (pid {proc.pid}, {version})")
    return state


def reuse_running(layout: Layout, timeout: float) -> State | None:
    """The running registry if it answers (waiting out one still starting); else stop it."""
    pid = running_pid(layout)
    state = read_state(layout)
    if pid is None:
        return None
    if state is not None and state.pid == pid:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if answers(state.url):
                info(f"reusing running registry (pid {pid})")
                return state
            time.sleep(0.2)
    info(f"registry pid {pid} is not answering; restarting it")
    terminate(pid, layout, 30)
    return None


def cmd_fetch(layout: Layout, args: argparse.Namespace) -> int:
    with locked(layout):
        fetch(layout, registry_version())
    info(f"app in {layout.app}")
    return EXIT_OK


def cmd_start(layout: Layout, args: argparse.Namespace) -> int:
    with locked(layout):
        state = reuse_running(layout, args.timeout)
        if state is not None and state.persist != args.persist:
            raise RegistryError(
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
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument(
        "--home",
        type=Path,
        default=Path(os.environ.get("VOICECLONE_REGISTRY_HOME") or DEFAULT_HOME),
        help="cache dir for the app, logs, state (env VOICECLONE_REGISTRY_HOME)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=env_int("VOICECLONE_REGISTRY_PORT"),
        help="HTTP port; 0 = any free port (env VOICECLONE_REGISTRY_PORT; default: the last one "
        "if free, else any free port)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds to wait for start (default 90) / a clean stop (default 30)",
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
    global _quiet
    args = parse_args(argv)
    _quiet = args.quiet
    if args.timeout is None:
        args.timeout = 30.0 if args.command == "stop" else 90.0
    layout = Layout(args.home.expanduser().resolve())
    try:
        return COMMANDS[args.command](layout, args)
    except RegistryError as exc:
        print(f"[registry] error: {exc}", file=sys.stderr)
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
