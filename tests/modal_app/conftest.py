"""The engine under test: the real qwen-tts code on the tiny model of tests.fixtures.model."""

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from modal_app.engine import Engine


@pytest.fixture(scope="session")
def engine(tiny_model_dir: Path) -> "Engine":
    from modal_app.engine import Engine  # imports torch: only for tests that ask for it

    return Engine.load(tiny_model_dir)


class CallRecorder:
    """Wraps a real method: records each call's keyword arguments and result, then returns it."""

    def __init__(self, method: Callable[..., Any]) -> None:
        self._method = method
        self.calls: list[dict[str, Any]] = []
        self.results: list[Any] = []

    def __call__(self, **kwargs: Any) -> Any:
        result = self._method(**kwargs)
        self.calls.append(kwargs)
        self.results.append(result)
        return result


@pytest.fixture
def record_model_calls(
    monkeypatch: pytest.MonkeyPatch,
) -> Callable[["Engine", str], CallRecorder]:
    """Count calls into the loaded qwen-tts model without changing what they do."""

    def record(engine: "Engine", method_name: str) -> CallRecorder:
        recorder = CallRecorder(getattr(engine.tts, method_name))
        monkeypatch.setattr(engine.tts, method_name, recorder)
        return recorder

    return record
