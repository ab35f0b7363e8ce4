"""Small measuring helpers: percentiles, medians, resident memory, the machine's description."""

import os
import platform
import statistics
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

_BROKER_SCRIPT = Path(__file__).resolve().parents[1] / "deploy" / "kafka" / "broker.py"


def percentile(values: list[float], pct: float) -> float:
    """The `pct` percentile (0-100) by linear interpolation between closest ranks."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    rank = (len(ordered) - 1) * pct / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: list[float]) -> float:
    return statistics.median(values)


def rss_bytes() -> int:
    """This process's resident memory now (Linux: /proc/self/status, VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def open_fds() -> int:
    """File descriptors this process holds open now (Linux: /proc/self/fd)."""
    return len(list(Path("/proc/self/fd").iterdir())) - 1  # less the one listing the folder


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages: how busy the shared machine was."""
    return [round(load, 2) for load in os.getloadavg()]


def machine(event_loop: str) -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(_memory_bytes() / 2**30, 1),
        "os": platform.platform(terse=True),
        "python": platform.python_version(),
        "event_loop": event_loop,
        "packages": {name: _version(name) for name in ("aiokafka", "fastavro", "pydantic")},
        "broker": _broker_version(),
    }


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _broker_version() -> str:
    """The local broker's Kafka version, as `deploy/kafka/broker.py status` reports it."""
    try:
        status = subprocess.run(
            [sys.executable, str(_BROKER_SCRIPT), "status"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    for word in status.split():
        if word.startswith("version="):
            return f"Apache Kafka {word.removeprefix('version=')} (deploy/kafka/broker.py)"
    return "unknown"
