"""The results as a Markdown table (what docs/benchmarks.md shows) and as JSON."""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

Row = tuple[str, str, str, str]
_HEADER = "| benchmark | result | target | met |\n|---|---|---|---|"


def write_json(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def table(results: dict[str, Any]) -> str:
    """The Markdown table of whichever scenarios `results` holds, then the machine."""
    scenarios = results["scenarios"]
    rows = [render(scenarios[name]) for name, render in _ROWS.items() if name in scenarios]
    lines = [_HEADER, *("| " + " | ".join(row) + " |" for row in rows)]
    return "\n".join(lines) + "\n\n" + machine_line(results["run"]) + "\n"


def machine_line(run: dict[str, Any]) -> str:
    m = run["machine"]
    start, end = run["load_average"]["start"][0], run["load_average"]["end"][0]
    return (
        f"Measured {run['started_at'][:16].replace('T', ' ')} UTC on {m['cpu']}, "
        f"{m['cores']} cores, {m['memory_gib']} GiB, {m['os']}; Python {m['python']} "
        f"({m['event_loop']}), aiokafka {m['packages']['aiokafka']}; {m['broker']} on the "
        f"same machine; load average {start} at the start, {end} at the end"
        f"{' (--quick)' if run['quick'] else ''}."
    )


def _met(met: bool | None) -> str:
    return "—" if met is None else ("yes" if met else "**no**")


def _overhead(r: dict[str, Any]) -> Row:
    p, rates = r["params"], r["msgs_per_s"]
    low, high = r["ratio_range"]
    tmpfs = (
        f"; storing to tmpfs instead of disk: {rates['worker_tmpfs']:,.0f} msg/s, ratio "
        f"{r['ratio_tmpfs']:.3f}"
        if r.get("ratio_tmpfs") is not None
        else ""
    )
    return (
        f"1. Relay overhead: {p['messages']:,} requests, instant backend, local storage, "
        f"{p['max_in_flight']} in flight, {p['repetitions']} interleaved runs (medians)",
        f"worker {rates['worker']:,.0f} msg/s, raw relay {rates['relay']:,.0f} msg/s: ratio "
        f"**{r['ratio']:.3f}** (runs {low:.3f} to {high:.3f}){tmpfs}",
        f"≥ {p['target_ratio']}",
        _met(r["met"]),
    )


def _concurrency(r: dict[str, Any]) -> Row:
    p = r["params"]
    return (
        f"2. Concurrency: {p['latency_seconds']:g} s backend, {p['max_in_flight']} in flight, "
        f"{p['requests']:,} requests over {p['partitions']} partitions",
        f"{r['throughput_per_s']:.1f} req/s of the {r['bound_per_s']:.0f}/s bound: "
        f"**{r['efficiency']:.3f}** (whole waves allow at most "
        f"{r['best_possible_efficiency']:.3f}){_wave(r)}{_concurrency_tmpfs(r)}",
        f"≥ {p['target_efficiency']}",
        _met(r["met"]),
    )


def _concurrency_tmpfs(r: dict[str, Any]) -> str:
    if "tmpfs" not in r:
        return ""
    tmpfs = r["tmpfs"]
    return (
        f"; storing to tmpfs instead of disk: {tmpfs['efficiency']:.3f} "
        f"({tmpfs['start_lag_per_wave_ms']:.0f} ms a wave)"
    )


def _wave(r: dict[str, Any]) -> str:
    if "start_lag_s" not in r:
        return ""
    return (
        f"; the last call began {r['start_lag_s']:.2f} s late "
        f"({r['start_lag_per_wave_ms']:.0f} ms a wave), its outcome {r['finish_s'] * 1000:.0f} "
        "ms after it ended"
    )


def _latency(r: dict[str, Any]) -> Row:
    p, w, relay = r["params"], r["worker"], r["relay"]
    return (
        f"3. Added latency: {p['rate_per_s']:g} req/s for {p['requests']:,} requests, instant "
        "backend; request produced → outcome received",
        f"p50 {w['p50_ms']:.1f} ms, p99 **{w['p99_ms']:.1f} ms** (raw relay, two Kafka hops: "
        f"p50 {relay['p50_ms']:.1f} ms, p99 {relay['p99_ms']:.1f} ms){_latency_tmpfs(r)}",
        f"p99 ≤ {p['target_p99_ms']:g} ms",
        _met(r["met"]),
    )


def _latency_tmpfs(r: dict[str, Any]) -> str:
    if "worker_tmpfs" not in r:
        return ""
    tmpfs = r["worker_tmpfs"]
    return (
        f"; storing to tmpfs instead of disk: p50 {tmpfs['p50_ms']:.1f} ms, "
        f"p99 {tmpfs['p99_ms']:.1f} ms"
    )


def _memory(r: dict[str, Any]) -> Row:
    p = r["params"]
    return (
        f"4. Memory: {p['in_flight']} requests in flight, each with its own "
        f"{r['reference_mb']:.1f} MB reference",
        f"**{r['rss_per_in_flight_mb']:.1f} MB** RSS per in-flight request "
        f"({r['traced_per_in_flight_mb']:.1f} MB allocated by Python); after they finish, "
        f"{r['rss_retained_per_request_mb']:.1f} MB each stays in the reference cache",
        "—",
        _met(None),
    )


def _soak(r: dict[str, Any]) -> Row:
    first, last = r["points"][0], r["points"][-1]

    def at(point: dict[str, Any]) -> str:
        return (
            f"{point['requests']:,}: {point['rss_mb']:.0f} MB RSS, {point['open_fds']} fds, "
            f"{point['tasks']} tasks, p50 {point['p50_ms']:.1f} / p99 {point['p99_ms']:.1f} ms"
        )

    p = r["params"]
    return (
        f"5. Soak: {p['requests']:,} requests at {p['rate_per_s']:.0f}/s through one worker",
        f"**{r['rss_growth']:+.1%}** RSS from {first['requests']:,} to {last['requests']:,} "
        f"requests ({at(first)}; {at(last)})",
        f"growth < {p['target_rss_growth']:.0%}",
        _met(r["met"]),
    )


_ROWS: dict[str, Callable[[dict[str, Any]], Row]] = {
    "relay_overhead": _overhead,
    "concurrency": _concurrency,
    "latency": _latency,
    "memory": _memory,
    "soak": _soak,
}
