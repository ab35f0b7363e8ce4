"""`python -m bench --profile FILE`: one worker run of the relay-overhead benchmark, sampled
by pyinstrument (wall-clock, event loop thread), its call tree written to FILE.

pyinstrument is not a dependency of the project; run it alongside for the occasion:
`uv run --frozen --with pyinstrument python -m bench --profile profile.txt`.
"""

import time
from typing import Any

from bench.scenarios import WORKER, Env, OverheadParams, throughput

_INTERVAL_S = 0.0005


async def profile_worker(env: Env, params: OverheadParams) -> tuple[dict[str, Any], str]:
    """Warm up, then profile one worker run of `params.messages` requests: its results and
    pyinstrument's call tree."""
    try:
        # Not a dependency: brought in for the run (the message below says how).
        from pyinstrument import Profiler  # pyright: ignore[reportMissingImports]
    except ImportError as exc:
        raise SystemExit(
            "--profile needs pyinstrument: uv run --frozen --with pyinstrument "
            "python -m bench --profile FILE"
        ) from exc
    reference = env.small_reference()
    await throughput(env, WORKER, OverheadParams(messages=params.warmup_messages), reference)
    profiler = Profiler(interval=_INTERVAL_S, async_mode="disabled")
    started = time.process_time()
    profiler.start()
    try:
        result = await throughput(env, WORKER, params, reference)
    finally:
        profiler.stop()
    result["cpu_s"] = time.process_time() - started
    return result, profiler.output_text(unicode=True, color=False)
