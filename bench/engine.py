"""`python -m bench.engine`: the talker's generation speed, stock loop against the fast one.

uv run --frozen python -m bench.engine --device cuda               # 1.7B and 0.6B, batch 1-64
uv run --frozen python -m bench.engine --size tiny --device cpu --batch 1,2 --frames 8

Random weights in the published configs' shapes (no hub download): the talker and its code
predictor run exactly the computation of the real models, but the end token is masked so every
row runs `--frames` frames. Both loops run on the same model in the same process, each timed
after warm-up runs (the fast loop captures its CUDA graphs there). One frame is 80 ms of audio.
Writes the results as JSON (default bench/results/engine-<device>.json) and prints a table.
"""

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from qwen_tts.core.models.configuration_qwen3_tts import Qwen3TTSTalkerConfig
from qwen_tts.core.models.modeling_qwen3_tts import Qwen3TTSTalkerForConditionalGeneration

from bench.report import write_json
from modal_app.fastgen import FastTalker, stock_talker_kwargs
from modal_app.synthetic import PUBLISHED_TALKERS

SECONDS_PER_FRAME = 0.08  # 12.5 Hz codec frames
_RESULTS = Path(__file__).resolve().parent / "results"

# The published checkpoints' talker shapes (modal_app.synthetic); "tiny" matches its tiny model,
# for a quick check on a CPU.
SIZES: dict[str, dict[str, Any]] = {
    **PUBLISHED_TALKERS,
    "tiny": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "vocab_size": 64 + 1024,
        "num_code_groups": 4,
        "text_hidden_size": 32,
        "text_vocab_size": 512,
        "rope_scaling": {"rope_type": "default", "mrope_section": [4, 2, 2], "interleaved": True},
        "codec_eos_token_id": 64 + 102,
        "code_predictor_config": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "vocab_size": 64,
            "num_code_groups": 4,
        },
    },
}


def build_talker(
    size: str, device: str, dtype: torch.dtype
) -> Qwen3TTSTalkerForConditionalGeneration:
    """A randomly initialised talker (with code predictor) of `size`, end token masked."""
    config = Qwen3TTSTalkerConfig(**SIZES[size])
    config._attn_implementation = "sdpa"
    config.code_predictor_config._attn_implementation = "sdpa"
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the target dtype, on the target device
    try:
        with torch.device(device):
            talker = Qwen3TTSTalkerForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    eos = config.codec_eos_token_id
    generation = talker.generation_config
    assert generation is not None  # a generative model makes one from its config
    generation.pad_token_id = eos
    generation.sequence_bias = [[[eos], -1e9]]  # never ends: fixed frame counts
    return talker


def talker_inputs(
    talker: Qwen3TTSTalkerForConditionalGeneration, rows: int, prompt: int
) -> dict[str, torch.Tensor]:
    """A prompt like qwen-tts builds for a short voice-clone request (random values)."""
    width, device = talker.config.hidden_size, talker.device
    kw = {"device": device, "dtype": talker.dtype}
    return {
        "inputs_embeds": torch.randn(rows, prompt, width, **kw) * 0.02,
        "attention_mask": torch.ones(rows, prompt, dtype=torch.long, device=device),
        "trailing_text_hidden": torch.randn(rows, 16, width, **kw) * 0.02,
        "tts_pad_embed": torch.randn(1, 1, width, **kw) * 0.02,
    }


def timed(run: Callable[[], Any], device: str, repeats: int) -> float:
    """Median wall seconds of `repeats` runs, the device drained before and after each."""
    seconds = []
    for _ in range(repeats):
        _synchronize(device)
        started = time.perf_counter()
        run()
        _synchronize(device)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def measure(
    talker: Qwen3TTSTalkerForConditionalGeneration,
    batch: int,
    frames: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    inputs = talker_inputs(talker, batch, args.prompt)
    kwargs = stock_talker_kwargs(talker.config, frames + 1)
    short = stock_talker_kwargs(talker.config, min(frames, 8) + 1)
    fast = FastTalker(talker)
    # (timed run, warm-up run): the fast loop warms up at full length, which captures a graph
    # for every attention length it will use; the stock loop has nothing to capture.
    loops: dict[str, tuple[Callable[[], object], ...]] = {
        "fast": (lambda: fast.generate(**inputs, **kwargs),) * 2
    }
    if not args.no_stock:
        loops["stock"] = (
            lambda: talker.generate(**inputs, **kwargs),
            lambda: talker.generate(**inputs, **short),
        )
    result: dict[str, Any] = {"batch": batch, "frames": frames}
    for name, (run, warm_up) in loops.items():
        torch.manual_seed(0)
        for _ in range(args.warmup):
            warm_up()
        seconds = timed(run, args.device, args.repeats)
        result[name] = {
            "seconds": seconds,
            "ms_per_frame": 1000 * seconds / frames,
            "x_real_time": frames * SECONDS_PER_FRAME / seconds,  # per stream
            "audio_seconds_per_second": batch * frames * SECONDS_PER_FRAME / seconds,
        }
    if "stock" in result:
        result["speedup"] = result["stock"]["seconds"] / result["fast"]["seconds"]
    return result


def table(results: dict[str, Any]) -> str:
    lines = [
        "| model | batch | loop | ms per frame | x real time (per stream) | audio s per s "
        "| fast / stock |",
        "|---|---|---|---|---|---|---|",
    ]
    for size, rows in results["sizes"].items():
        for row in rows:
            for loop in ("stock", "fast"):
                if loop not in row:
                    continue
                r = row[loop]
                ratio = f"{row['speedup']:.1f}x" if loop == "fast" and "speedup" in row else ""
                lines.append(
                    f"| {size} | {row['batch']} | {loop} | {r['ms_per_frame']:.1f} "
                    f"| {r['x_real_time']:.2f} | {r['audio_seconds_per_second']:.1f} | {ratio} |"
                )
    run = results["run"]
    return (
        "\n".join(lines)
        + f"\n\n{run['frames']} frames after a {run['prompt']}-token prompt, {run['dtype']}, "
        f"on {run['device_name']}; torch {run['torch']}; {run['started_at'][:16]} UTC.\n"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.engine", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument(
        "--size", default="1.7B,0.6B", help=f"comma-separated, of {', '.join(SIZES)}"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--batch", default="1,8,32,64", help="comma-separated batch sizes")
    parser.add_argument("--frames", type=int, default=64, help="frames per row (80 ms each)")
    parser.add_argument("--prompt", type=int, default=96, help="prompt length in positions")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per loop first")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per loop (median)")
    parser.add_argument("--no-stock", action="store_true", help="time the fast loop only")
    parser.add_argument(
        "--out", type=Path, help="JSON file (default bench/results/engine-<device>.json)"
    )
    args = parser.parse_args(argv)
    unknown = set(args.size.split(",")) - SIZES.keys()
    if unknown:
        parser.error(f"unknown sizes {sorted(unknown)}; choose from {', '.join(SIZES)}")
    args.batches = [int(batch) for batch in args.batch.split(",")]
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    dtype_name = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    dtype = getattr(torch, dtype_name)
    results: dict[str, Any] = {
        "run": {
            "started_at": datetime.now(UTC).isoformat(),
            "device_name": _device_name(args.device),
            "torch": torch.__version__,
            "dtype": dtype_name,
            "frames": args.frames,
            "prompt": args.prompt,
        },
        "sizes": {},
    }
    for size in args.size.split(","):
        talker = build_talker(size, args.device, dtype)
        rows = results["sizes"][size] = []
        for batch in args.batches:
            rows.append(measure(talker, batch, args.frames, args))
            print(f"{size} batch {batch}: {_summary(rows[-1])}", flush=True)
        del talker
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    out = args.out or _RESULTS / f"engine-{torch.device(args.device).type}.json"
    write_json(results, out)
    print("\n" + table(results))
    print(f"Results written to {out}")
    return results


def _summary(row: dict[str, Any]) -> str:
    parts = [
        f"{loop} {row[loop]['ms_per_frame']:.1f} ms/frame"
        for loop in ("stock", "fast")
        if loop in row
    ]
    if "speedup" in row:
        parts.append(f"fast/stock {row['speedup']:.2f}x")
    return ", ".join(parts)


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


if __name__ == "__main__":
    main()
