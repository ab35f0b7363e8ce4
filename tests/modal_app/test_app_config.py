"""What the Modal app declares for each model size, read without credentials or torch.

The module is imported afresh under each environment; `App.cls` is wrapped (and still called)
to see the snapshot options, which Modal keeps only in the definition it sends at deploy time.
"""

import ast
import importlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import modal
import pytest
from modal._utils.async_utils import synchronizer

from modal_app.profiles import PROFILES, SERVICE_CLASS_NAME, profile_for
from tests.fixtures.process import fresh_python

ENV_KEYS = (
    "VOICECLONE_MODEL_SIZE",
    "VOICECLONE_MODAL_GPUS",
    "VOICECLONE_MODAL_GPU_SNAPSHOT",
    "VOICECLONE_MODAL_MIN_CONTAINERS",
    "VOICECLONE_MODAL_SCALEDOWN_SECONDS",
    "VOICECLONE_MODAL_GENERATION",
    "VOICECLONE_MODAL_MAX_INPUTS",
    "VOICECLONE_MODAL_TARGET_INPUTS",
    "VOICECLONE_MODAL_COMPILE_STEPS",
    "VOICECLONE_MODAL_TRACE_DECODER",
)
EXPECTED = {
    "1.7B": ("voiceclone-qwen3-tts-1-7b", "Qwen/Qwen3-TTS-12Hz-1.7B-Base", ["A10G", "L4"]),
    "0.6B": ("voiceclone-qwen3-tts-0-6b", "Qwen/Qwen3-TTS-12Hz-0.6B-Base", ["T4", "L4"]),
}
REPO_ROOT = Path(__file__).resolve().parents[2]
METHODS = {"clone", "clone_batch", "languages", "health", "web"}

LoadApp = Callable[..., tuple[ModuleType, dict[str, Any]]]


@pytest.fixture
def load_app(monkeypatch: pytest.MonkeyPatch) -> Iterator[LoadApp]:
    declared: dict[str, Any] = {}
    real_cls = modal.App.cls
    real_concurrent = modal.concurrent

    def recording_cls(self: modal.App, *args: Any, **kwargs: Any) -> Any:
        declared.clear()  # called first (the outer decorator is built first)
        declared.update(kwargs)
        return real_cls(self, *args, **kwargs)

    def recording_concurrent(**kwargs: Any) -> Any:
        declared["concurrent"] = kwargs
        return real_concurrent(**kwargs)

    monkeypatch.setattr(modal.App, "cls", recording_cls)
    monkeypatch.setattr(modal, "concurrent", recording_concurrent)

    def load(**env: str) -> tuple[ModuleType, dict[str, Any]]:
        for key in ENV_KEYS:
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        sys.modules.pop("modal_app.app", None)
        return importlib.import_module("modal_app.app"), declared

    yield load
    sys.modules.pop("modal_app.app", None)  # the next importer gets the default environment


@pytest.mark.parametrize("size", ["1.7B", "0.6B"])
def test_each_size_declares_its_app_gpus_volume_limits_and_snapshots(
    load_app: LoadApp, size: str
) -> None:
    app_name, repo_id, gpus = EXPECTED[size]

    module, declared = load_app(VOICECLONE_MODEL_SIZE=size.lower())
    service = getattr(module, SERVICE_CLASS_NAME)
    info = service().clone.info()

    assert module.app.name == app_name
    assert module.PROFILE.repo_id == repo_id
    assert isinstance(service, modal.Cls)
    assert info.gpus == [(gpu, 1) for gpu in gpus]
    assert (info.timeout, info.startup_timeout) == (1800, 900)
    assert {path: mount.name for path, mount in info.volumes.items()} == {
        "/cache": "voiceclone-hf-cache"
    }
    assert set(info.method_names) >= METHODS
    assert declared["enable_memory_snapshot"] is True
    assert declared["experimental_options"] == {"enable_gpu_snapshot": True}
    assert (declared["min_containers"], declared["scaledown_window"]) == (0, 300)


def test_the_default_size_is_the_large_model(load_app: LoadApp) -> None:
    module, _ = load_app()

    assert module.app.name == "voiceclone-qwen3-tts-1-7b"
    assert module.SETTINGS.generation == "stock"


def test_the_generation_loop_is_a_deploy_setting(load_app: LoadApp) -> None:
    module, _ = load_app(VOICECLONE_MODAL_GENERATION="fast")

    assert module.SETTINGS.generation == "fast"


@pytest.mark.parametrize(
    ("size", "expected"), [("1.7B", (32, 16)), ("0.6B", (16, 8))], ids=["1.7B", "0.6B"]
)
def test_with_the_fast_loop_a_container_takes_many_inputs_sized_per_gpu_profile(
    load_app: LoadApp, size: str, expected: tuple[int, int]
) -> None:
    module, declared = load_app(VOICECLONE_MODEL_SIZE=size, VOICECLONE_MODAL_GENERATION="fast")

    max_inputs, target_inputs = expected
    assert declared["concurrent"] == {"max_inputs": max_inputs, "target_inputs": target_inputs}
    assert module.PROFILE.batch_rows >= target_inputs


def test_input_concurrency_is_a_deploy_setting(load_app: LoadApp) -> None:
    _, declared = load_app(
        VOICECLONE_MODAL_GENERATION="fast",
        VOICECLONE_MODAL_MAX_INPUTS="48",
        VOICECLONE_MODAL_TARGET_INPUTS="20",
    )

    assert declared["concurrent"] == {"max_inputs": 48, "target_inputs": 20}


def test_compiling_the_fast_loop_is_a_deploy_setting_off_by_default(load_app: LoadApp) -> None:
    default, _ = load_app(VOICECLONE_MODAL_GENERATION="fast")
    assert default.SETTINGS.compile_steps is False

    compiled, _ = load_app(VOICECLONE_MODAL_GENERATION="fast", VOICECLONE_MODAL_COMPILE_STEPS="1")
    assert compiled.SETTINGS.compile_steps is True


def test_the_traced_speech_decoder_is_a_deploy_setting_on_by_default(load_app: LoadApp) -> None:
    default, _ = load_app()
    assert default.SETTINGS.trace_decoder is True

    eager, _ = load_app(VOICECLONE_MODAL_TRACE_DECODER="0")
    assert eager.SETTINGS.trace_decoder is False


def test_the_stock_loop_takes_one_input_per_container(load_app: LoadApp) -> None:
    _, declared = load_app(VOICECLONE_MODAL_MAX_INPUTS="48")

    assert declared["concurrent"] == {"max_inputs": 1, "target_inputs": 1}


def test_the_download_function_fills_the_shared_volume(load_app: LoadApp) -> None:
    module, _ = load_app()
    info = module.download_models.info()

    assert {path: mount.name for path, mount in info.volumes.items()} == {
        "/cache": "voiceclone-hf-cache"
    }
    assert info.gpus == []
    assert info.timeout == 3600
    assert module.HF_HOME.startswith("/cache/")


def test_gpu_list_and_snapshot_mode_are_configurable(load_app: LoadApp) -> None:
    module, declared = load_app(
        VOICECLONE_MODEL_SIZE="0.6B",
        VOICECLONE_MODAL_GPUS="L4, A100-40GB",
        VOICECLONE_MODAL_GPU_SNAPSHOT="0",
        VOICECLONE_MODAL_MIN_CONTAINERS="1",
        VOICECLONE_MODAL_SCALEDOWN_SECONDS="120",
    )

    assert getattr(module, SERVICE_CLASS_NAME)().clone.info().gpus == [("L4", 1), ("A100-40GB", 1)]
    assert declared["enable_memory_snapshot"] is True  # CPU snapshots still
    assert "experimental_options" not in declared
    assert (declared["min_containers"], declared["scaledown_window"]) == (1, 120)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"VOICECLONE_MODEL_SIZE": "7B"}, r"Unknown model size '7B'; expected one of 1\.7B, 0\.6B"),
        ({"VOICECLONE_MODAL_GPU_SNAPSHOT": "maybe"}, r"Expected a boolean .*got 'maybe'"),
        (
            {"VOICECLONE_MODAL_GENERATION": "turbo"},
            r"generation must be one of stock, fast, not 'turbo'",
        ),
        (
            {"VOICECLONE_MODAL_MAX_INPUTS": "0"},
            r"VOICECLONE_MODAL_MAX_INPUTS must be 1 or more, got 0",
        ),
    ],
)
def test_bad_settings_fail_the_import_with_one_sentence(
    load_app: LoadApp, env: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        load_app(**env)


def test_importing_the_app_needs_no_torch_or_fastapi() -> None:
    """Deploying runs on a machine without the engine extra; only containers import those."""
    probe = "import sys, modal_app.app; print(sorted({'torch', 'fastapi'} & set(sys.modules)))"

    assert fresh_python(probe) == "[]"


def test_profiles_give_the_worker_stable_names() -> None:
    assert SERVICE_CLASS_NAME == "Qwen3TTSService"
    assert {size: profile.app_name for size, profile in PROFILES.items()} == {
        size: expected[0] for size, expected in EXPECTED.items()
    }
    assert profile_for(" 0.6b ").size == "0.6B"


def _our_imports(path: Path) -> set[str]:
    """The modules of this repository's packages that `path` imports."""
    ours = {"bench", "consumer", "deploy", "modal_app", "producer", "schemas", "tests"}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return {name for name in found if name.split(".")[0] in ours}


def test_the_service_speaks_the_contracts_vocabulary_and_ships_it(load_app: LoadApp) -> None:
    """Besides itself the service imports only the vocabulary (standard library only), and its
    image carries every package it imports."""
    imported = set().union(*map(_our_imports, (REPO_ROOT / "modal_app").glob("*.py")))
    app, _ = load_app()
    shipped = synchronizer._translate_in(app.image)._added_python_source_set

    assert {name for name in imported if not name.startswith("modal_app")} == {"schemas.vocabulary"}
    assert {name.split(".")[0] for name in imported} <= shipped
