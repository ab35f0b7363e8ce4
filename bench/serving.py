"""`python -m bench.serving`: many requests at once through the engine, batched against serial.

uv run --frozen python -m bench.serving                      # tiny model on the CPU (a smoke)
uv run --frozen python -m bench.serving --shape 1.7B --device cuda   # random full-size weights
uv run --frozen python -m bench.serving --model DIR --device cuda --concurrency 1,8,64

At each concurrency C, C clients each send requests one after another (closed loop), of mixed
text lengths, voices and languages, through `Engine.clone` with its decode and encoding. Two
modes run side by side in one process on one engine (fast loop): `batched`, every client's
request in the engine at once (continuous batching), and `serial`, one request in the engine at
a time, the others queued in front of it (as the engine served before). Reported per mode:
aggregate audio seconds per second, p50/p95 request latency and time to first frame (both from
the moment a client sends, so serial's include its queueing). Without `--model` a random model
of `modal_app.synthetic` is built, `--shape tiny` (default) or the published `0.6B` / `1.7B`
sizes (random weights, no hub needed); it never says its end token, so each request runs to
its text's frame cap: audio length follows text length. The voices are 3 s synthetic
references (38 codec frames; a realistic 3 to 10 s reference is 37 to 125) without
transcripts, so the requests clone in x-vector-only mode: no reference codes go into the
prompt or the decode, which decodes only each request's own frames. Writes JSON and a PNG plot of
throughput and latency against concurrency, prints a table, and ends with the line
`serving: concurrency=8 batched/serial=X.XX` (the throughput ratio at concurrency 8).
"""

import argparse
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import cycle, islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.report import write_json
from modal_app.audio import DecodedAudio
from modal_app.engine import CloneInput, Engine, EngineOptions
from modal_app.synthetic import SHAPES, build_random_model
from schemas.vocabulary import GenerationParams

MODES = ("batched", "serial")
SAMPLE_RATE = 24_000
_RESULTS = Path(__file__).resolve().parent / "results"
# Mixed lengths: one short sentence to a few; the frame cap makes audio follow text length.
_TEXTS = (
    "Hello there.",
    "The quick brown fox jumps over the lazy dog.",
    "Thank you for calling. Your order has shipped and will arrive on Tuesday.",
    "Good morning!",
    "Please listen carefully, as our menu options have changed. Press one for sales, "
    "two for support, or stay on the line.",
    "See you soon.",
)
_LANGUAGES = ("English", "Auto", "German", "English")


@dataclass(frozen=True)
class Timing:
    latency: float
    first_frame: float
    audio_seconds: float


def voices(count: int) -> list[DecodedAudio]:
    """`count` distinct synthetic voices (harmonics at different pitches plus noise), 3 s each."""
    time_axis = np.arange(3 * SAMPLE_RATE) / SAMPLE_RATE
    made = []
    for index in range(count):
        pitch = 110.0 + 23 * index
        wave = sum(np.sin(2 * np.pi * k * pitch * time_axis) / k for k in range(1, 5))
        noise = np.random.default_rng(index).normal(0.0, 0.01, time_axis.shape)
        made.append(DecodedAudio((0.15 * wave + noise).astype(np.float32), SAMPLE_RATE))
    return made


def workload(count: int, voice_count: int) -> list[CloneInput]:
    """`count` requests cycling through texts, voices and languages (seeded, so repeatable)."""
    speakers = voices(voice_count)
    return [
        CloneInput(
            text=text,
            language=language,
            reference_audio=voice,
            params=GenerationParams(seed=index),
        )
        for index, (text, language, voice) in enumerate(
            islice(zip(cycle(_TEXTS), cycle(_LANGUAGES), cycle(speakers)), count)
        )
    ]


def run_level(engine: Engine, requests: list[CloneInput], clients: int, mode: str) -> dict:
    """Send `requests` from `clients` closed-loop clients; `serial` lets one into the engine at
    a time. Returns the aggregate figures."""
    gate = threading.Semaphore(clients if mode == "batched" else 1)
    pending: Iterator[CloneInput] = iter(requests)
    take = threading.Lock()
    timings: list[Timing] = []
    errors: list[BaseException] = []

    def send(request: CloneInput) -> Timing:
        sent = time.perf_counter()
        first: list[float] = []
        with gate:
            output = engine.clone(
                request, on_first_frames=lambda: first.append(time.perf_counter())
            )
        done = time.perf_counter()
        return Timing(done - sent, (min(first) if first else done) - sent, output.duration_seconds)

    def client() -> None:
        while True:
            with take:
                request = next(pending, None)
            if request is None:
                return
            try:
                timings.append(send(request))
            except BaseException as exc:  # reported after the run, not lost in a thread
                errors.append(exc)
                return

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed in {mode} mode") from errors[0]
    return summarise(timings, wall)


def summarise(timings: list[Timing], wall: float) -> dict[str, Any]:
    audio = sum(timing.audio_seconds for timing in timings)
    return {
        "requests": len(timings),
        "wall_seconds": wall,
        "audio_seconds": audio,
        "audio_seconds_per_second": audio / wall,
        "latency_p50": percentile([t.latency for t in timings], 50),
        "latency_p95": percentile([t.latency for t in timings], 95),
        "first_frame_p50": percentile([t.first_frame for t in timings], 50),
        "first_frame_p95": percentile([t.first_frame for t in timings], 95),
    }


def percentile(values: list[float], q: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def table(results: dict[str, Any]) -> str:
    lines = [
        "| concurrency | mode | requests | audio s per s | latency p50 / p95 (s) "
        "| first frame p50 / p95 (s) | batched / serial |",
        "|---|---|---|---|---|---|---|",
    ]
    for level in results["levels"]:
        for mode in MODES:
            r = level[mode]
            ratio = f"{level['speedup']:.2f}x" if mode == "batched" else ""
            lines.append(
                f"| {level['concurrency']} | {mode} | {r['requests']} "
                f"| {r['audio_seconds_per_second']:.2f} "
                f"| {r['latency_p50']:.2f} / {r['latency_p95']:.2f} "
                f"| {r['first_frame_p50']:.2f} / {r['first_frame_p95']:.2f} | {ratio} |"
            )
    run = results["run"]
    return (
        "\n".join(lines)
        + f"\n\n{run['model']} on {run['device']} ({run['dtype']}), torch {run['torch']}, "
        f"{run['rounds']} requests per client; {run['started_at'][:16]} UTC.\n"
    )


def plot(results: dict[str, Any], path: Path) -> None:
    """Throughput and p50 latency against concurrency, one line per mode."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot

    levels = results["levels"]
    x = [level["concurrency"] for level in levels]
    figure, (throughput, latency) = pyplot.subplots(1, 2, figsize=(10, 4))
    for mode in MODES:
        throughput.plot(
            x, [lv[mode]["audio_seconds_per_second"] for lv in levels], "o-", label=mode
        )
        latency.plot(x, [lv[mode]["latency_p50"] for lv in levels], "o-", label=f"{mode} p50")
        latency.plot(x, [lv[mode]["latency_p95"] for lv in levels], "x--", label=f"{mode} p95")
    for axes, label in ((throughput, "audio seconds per second"), (latency, "latency (s)")):
        axes.set_xscale("log", base=2)
        axes.set_xlabel("concurrent requests")
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(f"Serving: {results['run']['model']} on {results['run']['device']}")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.serving", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--model", help="a model folder (default: build a random one, --shape)")
    parser.add_argument(
        "--shape", choices=SHAPES, default="tiny", help="the random model's size (no --model)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: the engine's choice")
    parser.add_argument("--concurrency", default="1,4,8,16,32,64", help="comma-separated")
    parser.add_argument("--rounds", type=int, default=2, help="requests per client and mode")
    parser.add_argument("--voices", type=int, default=4, help="distinct reference voices")
    parser.add_argument("--max-rows", type=int, default=64, help="the loop's batch rows")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--out", type=Path, help="JSON file (default bench/results/serving-<device>.json)"
    )
    args = parser.parse_args(argv)
    args.levels = [int(level) for level in args.concurrency.split(",")]
    return args


def load_engine(args: argparse.Namespace, scratch: Path) -> Engine:
    model = args.model
    if model is None:
        model = build_random_model(
            scratch / args.shape, args.shape, fixed_length=True, device=args.device
        )
    # About 4 frames per text token: what real speech takes, so tiny-model audio is realistic
    # in length; the default cap (12 per token) is a runaway guard, not a length.
    options = EngineOptions(
        generation="fast", max_batch_rows=args.max_rows, frames_per_text_token=4.0
    )
    engine = Engine.load(model, device=args.device, dtype=args.dtype, options=options)
    engine.warm_up()
    return engine


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        engine = load_engine(args, Path(scratch))
        info = engine.describe()
        results: dict[str, Any] = {
            "run": {
                "started_at": datetime.now(UTC).isoformat(),
                "model": f"{args.shape} (random)" if args.model is None else info.model,
                "device": info.gpu or info.device,
                "dtype": info.dtype,
                "torch": torch.__version__,
                "rounds": args.rounds,
            },
            "levels": [],
        }
        requests = workload(max(args.levels) * args.rounds, args.voices)
        for voice in {id(r.reference_audio): r for r in requests}.values():  # prompts cached
            engine.clone(voice)
        for clients in args.levels:
            chosen = requests[: clients * args.rounds]
            level: dict[str, Any] = {"concurrency": clients}
            for mode in MODES:
                level[mode] = run_level(engine, chosen, clients, mode)
            level["speedup"] = (
                level["batched"]["audio_seconds_per_second"]
                / level["serial"]["audio_seconds_per_second"]
            )
            results["levels"].append(level)
            print(f"concurrency {clients}: batched/serial {level['speedup']:.2f}", flush=True)
    kind = torch.device(args.device).type
    out = args.out or _RESULTS / f"serving-{kind}.json"
    write_json(results, out)
    plot(results, out.with_suffix(".png"))
    print("\n" + table(results))
    print(f"Results written to {out} and {out.with_suffix('.png')}")
    print(f"serving: concurrency=8 batched/serial={speedup_at(results, 8)}")
    return results


def speedup_at(results: dict[str, Any], concurrency: int) -> str:
    for level in results["levels"]:
        if level["concurrency"] == concurrency:
            return f"{level['speedup']:.2f}"
    return "n/a"


if __name__ == "__main__":
    main()
