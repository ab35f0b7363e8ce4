"""`python -m bench`: run the benchmarks against a broker, print the table, write the JSON.

uv run --frozen python -m bench                      # all five, about 7 minutes
uv run --frozen python -m bench --quick              # small sizes, about 30 s
uv run --frozen python -m bench --only latency,memory
uv run --frozen python -m bench --table bench/results/latest.json   # table of a past run
uv run --frozen --with pyinstrument python -m bench --profile profile.txt
"""

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import scenarios
from bench.measure import load_average, machine
from bench.profile import profile_worker
from bench.report import read_json, table, write_json
from producer.logs import LogFormat, LogLevel, configure_logging

_RESULTS = Path(__file__).resolve().parent / "results"
_TMPFS = Path("/dev/shm")
_PREFIX = "voiceclone-bench-"
Scenario = Callable[[scenarios.Env, Any], Awaitable[dict[str, Any]]]

# name → (benchmark, full-size parameters, --quick parameters)
SCENARIOS: dict[str, tuple[Scenario, Any, Any]] = {
    "relay_overhead": (
        scenarios.relay_overhead,
        scenarios.OverheadParams(),
        scenarios.OverheadParams(messages=500, repetitions=2, warmup_messages=50),
    ),
    "concurrency": (
        scenarios.concurrency,
        scenarios.ConcurrencyParams(),
        scenarios.ConcurrencyParams(requests=128),
    ),
    "latency": (
        scenarios.added_latency,
        scenarios.LatencyParams(),
        scenarios.LatencyParams(requests=200, warmup_requests=20),
    ),
    "memory": (scenarios.memory, scenarios.MemoryParams(), scenarios.MemoryParams(in_flight=4)),
    "soak": (
        scenarios.soak,
        scenarios.SoakParams(),
        scenarios.SoakParams(requests=600, checkpoints=(200, 600), window=200, rate_per_s=200),
    ),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument(
        "--bootstrap",
        default=os.environ.get("VOICECLONE_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:9092"),
        help="the broker (default: $VOICECLONE_KAFKA__BOOTSTRAP_SERVERS or 127.0.0.1:9092)",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: a check, not numbers")
    parser.add_argument(
        "--only", default=",".join(SCENARIOS), help=f"comma-separated, of {', '.join(SCENARIOS)}"
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="JSON results file (default: bench/results/latest.json, quick.json with --quick)",
    )
    parser.add_argument("--table", type=Path, help="print the table of a results file and exit")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="FILE",
        help="instead: profile one worker run of the relay-overhead benchmark into FILE",
    )
    args = parser.parse_args(argv)
    unknown = set(args.only.split(",")) - SCENARIOS.keys()
    if unknown:
        parser.error(f"unknown benchmarks {sorted(unknown)}; choose from {', '.join(SCENARIOS)}")
    return args


@contextlib.contextmanager
def _scratch() -> Iterator[tuple[Path, Path | None]]:
    """A scratch directory on disk, and one in memory where the machine has /dev/shm."""
    with contextlib.ExitStack() as stack:
        workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix=_PREFIX))
        tmpfs = None
        if _TMPFS.is_dir() and os.access(_TMPFS, os.W_OK):
            tmpfs = stack.enter_context(tempfile.TemporaryDirectory(prefix=_PREFIX, dir=_TMPFS))
        yield Path(workdir), Path(tmpfs) if tmpfs else None


async def run(bootstrap: str, names: list[str], quick: bool) -> dict[str, Any]:
    """Run the named benchmarks in order; the results with what they ran on."""
    started = datetime.now(UTC)
    load_start = load_average()
    results: dict[str, Any] = {}
    with _scratch() as (workdir, tmpfs):
        env = scenarios.Env.create(bootstrap, workdir, tmpfs)
        for name in names:
            benchmark, full, small = SCENARIOS[name]
            print(f"{name}: running", file=sys.stderr, flush=True)
            began = time.perf_counter()
            results[name] = await benchmark(env, small if quick else full)
            took = time.perf_counter() - began
            print(f"{name}: done in {took:.0f} s", file=sys.stderr, flush=True)
    return {
        "run": {
            "started_at": started.isoformat(),
            "finished_at": datetime.now(UTC).isoformat(),
            "quick": quick,
            "machine": machine(event_loop="asyncio"),
            "load_average": {"start": load_start, "end": load_average()},
        },
        "scenarios": results,
    }


async def profile(bootstrap: str, quick: bool) -> tuple[dict[str, Any], str]:
    """One worker run of the relay-overhead benchmark under pyinstrument."""
    _, full, small = SCENARIOS["relay_overhead"]
    with _scratch() as (workdir, tmpfs):
        env = scenarios.Env.create(bootstrap, workdir, tmpfs)
        return await profile_worker(env, small if quick else full)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.table is not None:
        print(table(read_json(args.table)), end="")
        return
    # As `voiceclone worker` logs: JSON lines at INFO, rendered in full, then discarded.
    with open(os.devnull, "w") as devnull:
        configure_logging(LogFormat.JSON, LogLevel.INFO, stream=devnull)
        if args.profile is not None:
            result, tree = asyncio.run(profile(args.bootstrap, args.quick))
            args.profile.write_text(tree)
            print(f"{result}\ncall tree: {args.profile}")
            return
        results = asyncio.run(run(args.bootstrap, args.only.split(","), args.quick))
    out = args.out or _RESULTS / ("quick.json" if args.quick else "latest.json")
    write_json(results, out)
    print(table(results), end="")
    print(f"\nresults: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
