"""A JVM service run from a cache dir, for dev and tests: what deploy/kafka/broker.py and
deploy/registry/registry.py share.

Each service keeps its jars, config, logs, pid and state files under one home. Its JVM's
command line carries `-Dvoiceclone.<name>.home=<home>`, so a pid file is trusted only while its
process bears that tag: nothing but a JVM started from that home is ever signalled.

The scripts run as `python3 deploy/<service>/<script>.py` and put this folder on sys.path to
import it. Standard library only, so it runs with any python3 >= 3.9.
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
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

HOST = "127.0.0.1"
EXIT_OK, EXIT_FAIL, EXIT_STOPPED = 0, 1, 3
POLL_SECONDS = 0.2  # between readiness probes and liveness checks


class ServiceError(Exception):
    """A failure worth a one-line message (and maybe a log tail), not a traceback."""


@dataclass
class JvmService:
    """One kind of service: what the shared scaffolding needs to know of it."""

    name: str  # "kafka": tags its JVMs (-Dvoiceclone.kafka.home) and prefixes its messages
    noun: str  # "broker": what the messages call one
    pid_file: str  # its file name in the home
    java_hint: str  # why it needs Java, for when there is none
    state_type: type[Any]  # a dataclass with `pid`: what the last start chose
    answers: Callable[[Any], bool]  # whether the service of a state serves its clients
    quiet: bool = False  # set from --quiet: no progress lines

    def info(self, message: str) -> None:
        if not self.quiet:
            print(f"[{self.name}] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class CacheDir:
    """The home of one service: the files every service keeps there. A script's `Layout`
    subclasses it, names its `SERVICE` and adds its own paths."""

    SERVICE: ClassVar[JvmService]

    home: Path

    @property
    def pid_file(self) -> Path:
        return self.home / self.SERVICE.pid_file

    @property
    def state_file(self) -> Path:
        return self.home / "state.json"

    @property
    def lock_file(self) -> Path:
        return self.home / ".lock"


# --- small helpers -------------------------------------------------------------------------------


def env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    return int(value) if value else None


def require_tool(name: str, hint: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ServiceError(f"'{name}' not found on PATH ({hint})")
    return path


def find_java(service: JvmService) -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").is_file():
        return str(Path(java_home) / "bin" / "java")
    return require_tool("java", service.java_hint)


def fetch_with_maven(
    service: JvmService,
    target: Path,
    marker: Path,
    wanted: str,
    what: str,
    mvn_args: Callable[[Path], list[str]],
    cwd: Path | None = None,
    unpack: Callable[[Path], None] | None = None,
) -> bool:
    """Fill `target` with what Maven fetches (`mvn_args(staging)`: the arguments after `mvn -q
    -B`, writing into `staging`), unless `marker` already says `wanted`; True when it fetched.

    Maven writes into a staging folder beside `target`, which `unpack` may rework (a
    ServiceError there leaves nothing behind); it is swapped in whole and the marker written
    last, so an interrupted fetch never leaves a half-filled folder behind a marker.
    """
    if marker.is_file() and marker.read_text().strip() == wanted:
        return False
    mvn = require_tool("mvn", f"Maven fetches {what} from Maven Central")
    staging = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    service.info(f"fetching {what} from Maven Central ...")
    try:
        _run_maven([mvn, "-q", "-B", *mvn_args(staging)], cwd)
        if unpack is not None:
            unpack(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.is_symlink() or target.is_file():
        target.unlink()
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    marker.write_text(f"{wanted}\n")
    return True


def _run_maven(cmd: list[str], cwd: Path | None) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=cwd)
    if result.returncode != 0:
        raise ServiceError(f"mvn failed ({result.returncode}):\n{result.stdout}{result.stderr}")


def read_state(layout: CacheDir) -> Any:
    """The state the last start wrote (kept after stop), or None."""
    try:
        return layout.SERVICE.state_type(**json.loads(layout.state_file.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def write_state(layout: CacheDir, state: Any) -> None:
    tmp = layout.state_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(state.__dict__, indent=2) + "\n")
    tmp.replace(layout.state_file)
    layout.pid_file.write_text(f"{state.pid}\n")


@contextlib.contextmanager
def locked(layout: CacheDir) -> Iterator[None]:
    """Serialise start/stop/fetch on one cache dir (e.g. parallel pytest sessions)."""
    layout.home.mkdir(parents=True, exist_ok=True)
    with open(layout.lock_file, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def log_tail(service: JvmService, logs: Sequence[tuple[Path, int]], lines: int = 40) -> str:
    """The end of what a run logged: each (log, where the run began in it)."""
    chunks = []
    for path, offset in logs:
        with contextlib.suppress(OSError), open(path, "rb") as handle:
            handle.seek(offset if offset <= file_size(path) else 0)  # 0: the log rolled over
            tail = handle.read().decode(errors="replace").splitlines()[-lines:]
            if tail:
                chunks.append(f"--- {path} (last {len(tail)} lines) ---\n" + "\n".join(tail))
    return "\n".join(chunks) or f"(the {service.noun} logged nothing)"


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


def home_flag(layout: CacheDir) -> str:
    """Tags the JVM's command line so we only ever signal a service from *this* cache dir."""
    return f"-Dvoiceclone.{layout.SERVICE.name}.home={layout.home}"


def is_ours(pid: int, layout: CacheDir) -> bool:
    """Whether `pid` is alive and a JVM started from this cache dir (it bears its tag)."""
    return home_flag(layout) in process_cmdline(pid)


def running_pid(layout: CacheDir) -> int | None:
    """The pid of this cache dir's service if it is alive; drops a stale pid file."""
    try:
        pid = int(layout.pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    if is_ours(pid, layout):
        return pid
    layout.pid_file.unlink(missing_ok=True)
    return None


def wait_for_exit(pid: int, layout: CacheDir, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_ours(pid, layout):
            return True
        time.sleep(0.1)
    return False


def terminate(pid: int, layout: CacheDir, timeout: float) -> None:
    """SIGTERM lets the service shut down cleanly (Kafka: no log recovery next start); SIGKILL
    if it hangs."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not wait_for_exit(pid, layout, timeout):
        layout.SERVICE.info(
            f"pid {pid} did not stop within {timeout:.0f}s of SIGTERM; sending SIGKILL"
        )
        kill(pid, layout)
    layout.pid_file.unlink(missing_ok=True)


def kill(pid: int, layout: CacheDir) -> None:
    """SIGKILL: the service dies as in a crash, with no chance to hand anything over."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if not wait_for_exit(pid, layout, 10):
        raise ServiceError(f"pid {pid} survived SIGKILL")
    layout.pid_file.unlink(missing_ok=True)


def daemonise(
    layout: CacheDir, command: list[str], log: Path, mode: str, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start `command` in the home, its output into `log` (opened with `mode`), in a session of
    its own: no controlling terminal, no SIGINT/SIGHUP from the starter's shell, and it
    outlives this process."""
    with open(log, mode) as out:
        return subprocess.Popen(
            command,
            cwd=layout.home,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def await_answer(
    layout: CacheDir,
    proc: subprocess.Popen[bytes],
    state: Any,
    address: str,
    timeout: float,
    logs: Sequence[tuple[Path, int]],
    hint: str = "",
) -> None:
    """Wait until the spawned service answers; if it exits or the time runs out, stop it and
    say why (and `hint`), with the end of what it logged (`log_tail`)."""
    service = layout.SERVICE
    deadline = time.monotonic() + timeout
    while not service.answers(state):
        failure = None
        if proc.poll() is not None:
            failure = f"{service.noun} exited with code {proc.returncode} during startup"
        elif time.monotonic() > deadline:
            failure = f"{service.noun} did not answer on {address} within {timeout:.0f}s"
        if failure:
            terminate(proc.pid, layout, 10)
            raise ServiceError(f"{failure}{hint}\n{log_tail(service, logs)}")
        time.sleep(POLL_SECONDS)


def reuse_running(layout: CacheDir, timeout: float) -> Any:
    """The running service's state if it answers (waiting out one still starting up); else
    stop it and return None."""
    service = layout.SERVICE
    pid = running_pid(layout)
    state = read_state(layout)
    if pid is None:
        return None
    if state is not None and state.pid == pid:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if service.answers(state):
                service.info(f"reusing running {service.noun} (pid {pid})")
                return state
            time.sleep(POLL_SECONDS)
    service.info(f"{service.noun} pid {pid} is not answering; restarting it")
    terminate(pid, layout, 30)
    return None


# --- ports ---------------------------------------------------------------------------------------


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the JVM binds: a port whose old connections linger in TIME_WAIT is free to take.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def choose_port(explicit: int | None, preferred: int | None, name: str) -> int:
    """explicit (0 = any free port; must be free) > preferred if free > any free port."""
    if explicit:
        if not port_is_free(explicit):
            raise ServiceError(f"{name} port {explicit} on {HOST} is already in use")
        return explicit
    if explicit is None and preferred and port_is_free(preferred):
        return preferred
    return free_port()


# --- the command line ----------------------------------------------------------------------------


def add_common_arguments(
    parser: argparse.ArgumentParser, commands: Mapping[str, object], home: Path, home_help: str
) -> None:
    """The command, --home (default `home`) and --timeout, as every service's script takes them."""
    parser.add_argument("command", choices=commands)
    parser.add_argument("--home", type=Path, default=home, help=home_help)
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds to wait for start (default 90) / a clean stop (default 30)",
    )


def run(
    layout_type: type[CacheDir],
    commands: Mapping[str, Callable[[Any, argparse.Namespace], int]],
    args: argparse.Namespace,
) -> int:
    """Run the parsed command on its home; a ServiceError is one line on stderr and exit 1."""
    service = layout_type.SERVICE
    service.quiet = args.quiet
    if args.timeout is None:
        args.timeout = 30.0 if args.command == "stop" else 90.0
    layout = layout_type(args.home.expanduser().resolve())
    try:
        return commands[args.command](layout, args)
    except ServiceError as exc:
        print(f"[{service.name}] error: {exc}", file=sys.stderr)
        return EXIT_FAIL
