"""The main job on one machine: a worker with the local engine, and one request through it.

    python deploy/demo.py run [--model synthetic|DIR|HUB_ID] [--reference WAV --transcript TEXT]
    python deploy/demo.py stop
    python deploy/demo.py model

`run` chooses the model (without `--model`: the official 1.7B weights from the Hugging Face
cache; else downloaded once when the hub answers; else the synthetic model, with a banner saying
its audio is noise), creates the product's topics where missing, registers the event schemas when
VOICECLONE_SCHEMA_REGISTRY_URL is set (registry mode: `make run REGISTRY=1`), (re)starts a worker
in the background (backend `local`, storage in `var/audio`, log in `var/worker.log`), waits until
it has started, then sends one request with `voiceclone request --wait` and prints its outcome
and the audio file's path. The worker keeps running for more requests until `stop`. Only this
step ever downloads weights: the worker itself never does.

Standard library only, so `stop` works without the project's environment; `run` must be started
with the environment's Python (`uv run python deploy/demo.py run`), which it hands to the worker.
Settings already in the environment (`VOICECLONE_*`) win over the ones chosen here, except the
backend kind, and the model where `--model` is given.
"""

import argparse
import json
import math
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import wave
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VAR = ROOT / "var"
PID_FILE = VAR / "worker.pid"
LOG_FILE = VAR / "worker.log"
DEMO_DIR = VAR / "demo"
SYNTHETIC_MODEL = ROOT / ".cache" / "models" / "synthetic-qwen3-tts"
# Loading torch takes seconds, a real 1.7B model on a CPU minutes.
START_TIMEOUT_SECONDS = 900.0
STOP_TIMEOUT_SECONDS = 45.0  # the worker's shutdown grace (30 s) plus closing
# Short: with real weights on a laptop's CPU every second of speech takes a while to generate.
SAMPLE_TEXT = "Hello from the voiceclone worker."
PROGRESS_EVERY_SECONDS = 15.0
# How long the hub may take to answer before the demo falls back to the synthetic model: long
# enough for a slow network, short enough that an offline machine is not kept waiting.
HUB_PROBE_SECONDS = 5.0
SAMPLE_RATE = 24_000
START_HINT = (
    "With `make run`: MODEL=/path/to/model for your weights, or MODEL=synthetic (also "
    "`make run-offline`) for the tiny offline model."
)


class DemoError(Exception):
    """Something the user has to fix; printed as one line."""


def info(message: str) -> None:
    print(f"demo: {message}", file=sys.stderr, flush=True)


def voiceclone(*args: str) -> list[str]:
    """The `voiceclone` command line, with this interpreter (so: this environment)."""
    return [sys.executable, "-m", "consumer", *args]


# --- the worker ---------------------------------------------------------------------------------


def worker_env(model: str | None) -> dict[str, str]:
    """The environment of the demo worker: local backend, local storage it may read refs from."""
    env = dict(os.environ)
    storage_root = ROOT / env.setdefault("VOICECLONE_STORAGE__LOCAL_ROOT", str(VAR / "audio"))
    env["VOICECLONE_BACKEND__KIND"] = "local"
    # The client uploads references under <storage root>/references (REFERENCES_NAMESPACE of
    # producer/storage/base.py), apart from the audio in <storage root>/audio; only those may be
    # read.
    env.setdefault("VOICECLONE_REFERENCE__ALLOWED_SCHEMES", '["https", "s3", "file"]')
    env.setdefault("VOICECLONE_REFERENCE__FILE_ROOT", str(storage_root.resolve() / "references"))
    env.setdefault("VOICECLONE_LOG_FORMAT", "console")
    if model == "synthetic":
        folder = str(synthetic_model())
        env["VOICECLONE_BACKEND__LOCAL__MODEL_1_7B"] = folder
        env["VOICECLONE_BACKEND__LOCAL__MODEL_0_6B"] = folder  # one engine serves both sizes
    elif model:
        env["VOICECLONE_BACKEND__LOCAL__MODEL_1_7B"] = model
        env.setdefault("VOICECLONE_BACKEND__LOCAL__MODEL_0_6B", "")  # only what was named
    return env


def synthetic_model() -> Path:
    """The tiny random Qwen3-TTS (it speaks noise), built once into .cache/."""
    if (SYNTHETIC_MODEL / "config.json").exists():
        return SYNTHETIC_MODEL
    info(f"building the synthetic model into {SYNTHETIC_MODEL.relative_to(ROOT)}")
    partial = SYNTHETIC_MODEL.with_name(f"{SYNTHETIC_MODEL.name}.partial-{os.getpid()}")
    command = [sys.executable, "-m", "modal_app.synthetic", str(partial)]
    # Its output is import chatter (flash-attn, SoX); shown only when the build fails.
    built = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT)
    if built.returncode != 0:
        raise DemoError(f"building the synthetic model failed:\n{built.stderr[-3000:]}")
    partial.rename(SYNTHETIC_MODEL)
    return SYNTHETIC_MODEL


# --- the model --------------------------------------------------------------------------------


def official_weights() -> str:
    """The official hub id of the model the sample request asks for (the request's default)."""
    from schemas.vocabulary import DEFAULT_MODEL

    return DEFAULT_MODEL.hub_id


def download_command() -> str:
    return f"uv run hf download {official_weights()}"


def choose_model(requested: str | None) -> str | None:
    """What the worker serves: `requested` if given; None where the environment names the
    weights itself; else the official weights (cached, or downloaded now when the hub answers);
    else `synthetic`, with a banner that says why its audio is noise."""
    if requested:
        return requested
    if os.environ.get("VOICECLONE_BACKEND__LOCAL__MODEL_1_7B"):
        return None  # the settings already in the environment win
    from huggingface_hub import constants

    repo = official_weights()
    if is_cached(repo):
        info(f"model: the official weights {repo}, from the Hugging Face cache")
        return repo
    if constants.HF_HUB_OFFLINE:
        return fall_back("HF_HUB_OFFLINE is set, so nothing is downloaded")
    try:
        size = hub_download_size(repo)
    except Exception as exc:  # any failure to answer means: no download on this machine
        why = f"the model hub ({constants.ENDPOINT}) did not answer within "
        return fall_back(f"{why}{HUB_PROBE_SECONDS:.0f} s ({short(exc)})")
    download(repo, size)
    return repo


def short(exc: BaseException) -> str:
    """An error in a few words: its innermost cause (requests wraps the socket's error in two
    layers of messages hundreds of characters long), without the connection's description."""
    for _ in range(10):  # bounded: a chain could loop
        inner = getattr(exc, "reason", None)
        if not isinstance(inner, BaseException):
            first = exc.args[0] if exc.args else None
            inner = first if isinstance(first, BaseException) else exc.__cause__
        if not isinstance(inner, BaseException) or inner is exc:
            break
        exc = inner
    text = f"{type(exc).__name__}: {str(exc).rpartition('): ')[2]}"
    return text if len(text) <= 120 else f"{text[:119]}…"


def is_cached(repo: str) -> bool:
    """The weights are in the Hugging Face cache (complete: a snapshot, not a partial download)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot_download(repo, local_files_only=True)
    except LocalEntryNotFoundError:
        return False
    return True


def hub_download_size(repo: str) -> int:
    """The bytes of `repo`'s files, from the hub; raises when it does not answer in time.

    In a daemon thread bounded by the probe's time: a request's own timeout does not cover a
    name lookup, which a misconfigured resolver can keep waiting for much longer."""
    from huggingface_hub import HfApi

    answer: dict[str, object] = {}

    def probe() -> None:
        try:
            model = HfApi().model_info(repo, files_metadata=True, timeout=HUB_PROBE_SECONDS)
            answer["size"] = sum(sibling.size or 0 for sibling in model.siblings or ())
        except Exception as exc:
            answer["error"] = exc

    thread = threading.Thread(target=probe, name="hub-probe", daemon=True)
    thread.start()
    thread.join(HUB_PROBE_SECONDS)
    if "size" in answer:
        return int(answer["size"])  # type: ignore[call-overload]
    error = answer.get("error")
    raise error if isinstance(error, Exception) else TimeoutError("no answer")


def download(repo: str, size: int) -> None:
    """Fetch `repo` into the Hugging Face cache: a progress bar per file, resumed if cut."""
    from huggingface_hub import constants, snapshot_download

    info(
        f"downloading the official weights {repo} ({human_size(size)}) once into the Hugging "
        f"Face cache ({constants.HF_HUB_CACHE}); interrupted, the next `make run` resumes it. "
        "To skip it: MODEL=synthetic (noise), or MODEL=DIR for weights you have."
    )
    snapshot_download(repo)


def human_size(size: int) -> str:
    return f"{size / 1e9:.1f} GB" if size >= 100_000_000 else f"{size / 1e6:.1f} MB"


def fall_back(why: str) -> str:
    """The synthetic model, announced so that nobody takes its noise for the product's speech."""
    rule = "=" * 78
    for line in (
        rule,
        "THE AUDIO OF THIS RUN IS NOISE: it comes from a randomly initialised model of the same",
        "architecture as Qwen3-TTS (the synthetic test model), not from the trained weights.",
        f"Why: the official weights ({official_weights()}) are not in the Hugging Face cache,",
        f"and {why}.",
        "The pipeline itself (Kafka, worker, engine, storage, events) runs for real.",
        "For real speech, get the weights once (several GB), then `make run` again:",
        f"    {download_command()}",
        rule,
    ):
        info(line)
    return "synthetic"


def prepare(env: dict[str, str], *args: str, what: str) -> None:
    """One `voiceclone` command that must succeed before the worker starts."""
    done = subprocess.run(
        voiceclone(*args), cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise DemoError(f"{what} failed:\n{error_line(done.stderr)}")


def create_topics(env: dict[str, str]) -> None:
    """`voiceclone topics create`: the broker makes no topic on first use."""
    prepare(env, "topics", "create", what="creating the topics")


def register_schemas(env: dict[str, str]) -> None:
    """In registry mode, `voiceclone schemas register`: the worker only looks schemas up."""
    if env.get("VOICECLONE_SCHEMA_REGISTRY_URL"):
        prepare(env, "schemas", "register", what="registering the schemas")
        info(f"registry mode: schemas registered at {env['VOICECLONE_SCHEMA_REGISTRY_URL']}")


def start_worker(env: dict[str, str]) -> int:
    """Start a worker in its own session (Ctrl-C on make leaves it be); its pid once started."""
    VAR.mkdir(parents=True, exist_ok=True)
    Path(env["VOICECLONE_REFERENCE__FILE_ROOT"]).mkdir(parents=True, exist_ok=True)
    with LOG_FILE.open("wb") as log:
        process = subprocess.Popen(
            voiceclone("worker"),
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    PID_FILE.write_text(f"{process.pid}\n")
    info(f"worker pid {process.pid} starting; log: {LOG_FILE.relative_to(ROOT)}")
    wait_started(process)
    return process.pid


def wait_started(process: subprocess.Popen[bytes]) -> None:
    """Return once the worker logs `worker_started`; raise with its own error if it exits."""
    progress = Progress("the worker is loading the model")
    while progress.seconds() < START_TIMEOUT_SECONDS:
        log = LOG_FILE.read_text(errors="replace")
        if "worker_started" in log:
            return
        if process.poll() is not None:
            PID_FILE.unlink(missing_ok=True)
            raise DemoError(f"the worker could not start:\n{error_line(log)}\n{START_HINT}")
        progress.tick()
        time.sleep(0.2)
    raise DemoError(
        f"the worker did not start within {START_TIMEOUT_SECONDS:.0f} s; see {LOG_FILE}"
    )


class Progress:
    """A line every PROGRESS_EVERY_SECONDS while something slow runs (a real model on a CPU)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.started = time.monotonic()
        self.next_report = self.started + PROGRESS_EVERY_SECONDS

    def seconds(self) -> float:
        return time.monotonic() - self.started

    def tick(self) -> None:
        if time.monotonic() >= self.next_report:
            info(f"{self.what} ({self.seconds():.0f} s so far)")
            self.next_report += PROGRESS_EVERY_SECONDS


def error_line(log: str) -> str:
    """The worker's one-line error, else the end of its log."""
    errors = [line for line in log.splitlines() if line.startswith("voiceclone: error:")]
    return errors[-1] if errors else "\n".join(log.splitlines()[-20:])


def running_worker() -> int | None:
    """The demo worker's pid if it is alive; forgets a stale pid file."""
    try:
        pid = int(PID_FILE.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    if "consumer worker" in process_cmdline(pid):
        return pid
    PID_FILE.unlink(missing_ok=True)
    return None


def process_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return ""
    except OSError:  # no /proc (macOS)
        ps = ["ps", "-o", "command=", "-p", str(pid)]
        return subprocess.run(ps, capture_output=True, text=True, check=False).stdout


def stop_worker() -> None:
    """SIGTERM (the worker drains and exits), SIGKILL if it is still there after the grace."""
    pid = running_worker()
    if pid is None:
        info("no demo worker is running")
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
    while running_worker() == pid and time.monotonic() < deadline:
        time.sleep(0.2)
    if running_worker() == pid:
        info(f"worker pid {pid} still running after {STOP_TIMEOUT_SECONDS:.0f} s; SIGKILL")
        os.kill(pid, signal.SIGKILL)
    PID_FILE.unlink(missing_ok=True)
    info(f"worker pid {pid} stopped")


# --- the sample request -------------------------------------------------------------------------


def write_reference(path: Path, seconds: float = 2.0) -> Path:
    """A voiced-sounding synthetic recording (harmonics, vibrato, syllable-rate envelope):
    made at run time so the repository carries no audio."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = bytearray()
    for n in range(int(seconds * SAMPLE_RATE)):
        t = n / SAMPLE_RATE
        phase = 2 * math.pi * 150.0 * (t + 0.002 * math.sin(2 * math.pi * 5 * t))
        envelope = 0.5 + 0.5 * math.sin(2 * math.pi * 4 * t) ** 2
        value = 0.15 * envelope * sum(math.sin(k * phase) / k for k in range(1, 6))
        frames += struct.pack("<h", round(value * 32767))
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes(bytes(frames))
    return path


def send_sample(args: argparse.Namespace, env: dict[str, str]) -> int:
    """`voiceclone request --wait`: prints the request id, then the outcome's JSON line."""
    reference = args.reference or write_reference(DEMO_DIR / "reference.wav")
    command = voiceclone(
        "request",
        args.text,
        "--reference",
        str(reference),
        "--language",
        args.language,
        "--wait",
        "--timeout",
        str(args.timeout),
        "--download",
        str(DEMO_DIR),
    )
    if args.transcript:
        command += ["--transcript", args.transcript]
    info(f"sending a request with reference {reference}")
    # Its output is two short lines (the id, the outcome), so the pipe is read once it exits.
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    progress = Progress("waiting for the outcome")
    while process.poll() is None:
        progress.tick()
        time.sleep(0.2)
    output = process.communicate()[0]
    print(output, end="", flush=True)
    outcomes = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    for outcome in outcomes:
        if "file" in outcome:
            info(f"the audio: {outcome['file']}")
    return process.returncode


def run(args: argparse.Namespace) -> int:
    model = choose_model(args.model)
    env = worker_env(model)
    create_topics(env)
    register_schemas(env)
    if running_worker() is not None:
        info("restarting the running demo worker")
        stop_worker()
    start_worker(env)
    code = send_sample(args, env)
    state = "done" if code == 0 else f"the request ended with exit code {code}"
    if model == "synthetic":
        state += f" (synthetic model: the audio is noise; real weights: `{download_command()}`)"
    info(
        f"{state}. The worker keeps running (log: {LOG_FILE.relative_to(ROOT)}); send more with "
        "`uv run voiceclone request --reference FILE --wait TEXT`; stop it with "
        "`make worker-stop`."
    )
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="(re)start the worker and send one request")
    run_parser.add_argument(
        "--model",
        help="synthetic (a tiny offline model that speaks noise), or a model directory or "
        "cached hub id for the 1.7B size; default: the official 1.7B weights, downloaded "
        "once if the hub answers, else the synthetic model",
    )
    run_parser.add_argument("--reference", type=Path, help="your own reference recording")
    run_parser.add_argument("--transcript", help="what the reference recording says")
    run_parser.add_argument("--text", default=SAMPLE_TEXT, help="what to say")
    run_parser.add_argument("--language", default="english")
    run_parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait")
    commands.add_parser("stop", help="stop the demo worker")
    commands.add_parser(
        "model", help="choose the model `run` would serve, downloading it if it would; print it"
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return run(args)
        if args.command == "model":
            print(choose_model(None) or "(the VOICECLONE_BACKEND__LOCAL__* settings)")
            return 0
        stop_worker()
    except DemoError as exc:
        info(str(exc))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
