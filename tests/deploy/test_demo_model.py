"""`make run`'s choice of model (`deploy/demo.py model`, the step `run` starts with): the
official weights when cached; downloaded when the hub answers; else the synthetic model, with a
banner that says its audio is noise, within a few seconds, however the hub fails to answer."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modal_app.profiles import PROFILES
from tests.fixtures.hub import COMMIT, FakeHub

# huggingface_hub comes with the engine extra, which `make run` installs.
pytestmark = pytest.mark.engine
pytest.importorskip("huggingface_hub", reason="needs the engine extra")

DEMO = Path(__file__).resolve().parents[2] / "deploy" / "demo.py"
OFFICIAL = PROFILES["1.7B"].repo_id
BANNER = "THE AUDIO OF THIS RUN IS NOISE: it comes from a randomly initialised model"
GET_WEIGHTS = f"uv run hf download {OFFICIAL}"


def choose(hf_home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`demo.py model` in a process of its own, with its own Hugging Face cache."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "VOICECLONE_"))}
    return subprocess.run(
        [sys.executable, str(DEMO), "model"],
        env=clean | {"HF_HOME": str(hf_home)} | env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def cache_snapshot(hf_home: Path, repo: str) -> Path:
    """A complete snapshot of `repo` in the cache, laid out as huggingface_hub writes one."""
    folder = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(COMMIT)
    snapshot = folder / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    return snapshot


def test_cached_official_weights_are_used_without_asking_the_hub(
    tmp_path: Path, closed_port: int
) -> None:
    cache_snapshot(tmp_path, OFFICIAL)

    done = choose(tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{closed_port}")

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == OFFICIAL
    assert "from the Hugging Face cache" in done.stderr
    assert BANNER not in done.stderr


def test_a_hub_that_answers_gives_the_official_weights_downloaded_once(
    tmp_path: Path, fake_hub: FakeHub
) -> None:
    done = choose(tmp_path, HF_ENDPOINT=fake_hub.endpoint)

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == OFFICIAL
    assert f"downloading the official weights {OFFICIAL} (1.5 MB)" in done.stderr
    snapshot = tmp_path / "hub" / f"models--{OFFICIAL.replace('/', '--')}" / "snapshots" / COMMIT
    assert {path.name: path.read_bytes() for path in snapshot.iterdir()} == fake_hub.files
    assert BANNER not in done.stderr

    fake_hub.requests.clear()
    again = choose(tmp_path, HF_ENDPOINT=fake_hub.endpoint)
    assert again.stdout.strip() == OFFICIAL
    assert "from the Hugging Face cache" in again.stderr
    assert fake_hub.requests == []  # the second run finds them: no download, no probe


@pytest.mark.parametrize("hub", ["refusing", "silent", "offline"])
def test_no_answering_hub_means_the_synthetic_model_with_a_banner(
    tmp_path: Path, hub: str, closed_port: int, silent_hub: str
) -> None:
    env = {
        "refusing": {"HF_ENDPOINT": f"http://127.0.0.1:{closed_port}"},
        "silent": {"HF_ENDPOINT": silent_hub},
        "offline": {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": silent_hub},
    }[hub]
    started = time.monotonic()

    done = choose(tmp_path, **env)

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "synthetic"
    banner = " ".join(line.removeprefix("demo: ") for line in done.stderr.splitlines())
    assert BANNER in banner
    assert "of the same architecture as Qwen3-TTS" in banner
    assert f"Why: the official weights ({OFFICIAL}) are not in the Hugging Face cache" in banner
    assert GET_WEIGHTS in banner
    # Within the probe's bound (5 s) plus the interpreter's start, never a network timeout.
    assert time.monotonic() - started < 15
    assert max(map(len, done.stderr.splitlines())) <= 140  # the reason in a few words
    if hub == "offline":
        assert "HF_HUB_OFFLINE is set" in banner
    else:
        assert "did not answer within 5 s" in banner
    if hub == "refusing":
        assert "(ConnectionRefusedError: " in banner
        assert "Connection refused)" in banner


def test_a_model_named_in_the_environment_is_left_to_the_settings(tmp_path: Path) -> None:
    done = choose(tmp_path, VOICECLONE_BACKEND__LOCAL__MODEL_1_7B=str(tmp_path))

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(the VOICECLONE_BACKEND__LOCAL__* settings)"
