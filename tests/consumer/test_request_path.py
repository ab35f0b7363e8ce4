"""How many of our files one request runs through, poll to commit: a reader following a request
opens each of them, so the worker keeps the count small (docs/architecture.md lists them).

Measured, not estimated: a profiler records every function of our packages that runs while
the worker handles one record or commits (in that task, and in the tasks and threads it
starts), for one request answered by a worker run until idle on Kafka in memory, with the HTTP
backend and local storage."""

import contextvars
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from consumer.backends import BackendSettings
from schemas.events import AudioReady
from tests.fixtures.memory_kafka import MemoryKafka
from tests.fixtures.seed import SeedServer
from tests.fixtures.worker import (
    Outcomes,
    Requests,
    WorkerSettingsFactory,
    clone_request,
    run_until_idle,
)

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("consumer", "producer", "schemas", "modal_app")
MOST_FILES = 14

# Where one record's handling starts and where its offset is committed.
ANCHORS = {
    ("consumer/worker.py", "_start"),
    ("consumer/worker.py", "_handle"),
    ("consumer/worker.py", "_commit_now"),
    ("consumer/handler.py", "handle"),
    ("consumer/pipeline.py", "process"),
}

_in_request = contextvars.ContextVar("in_request", default=False)


def _ours(filename: str) -> str | None:
    path = Path(filename)
    if not path.is_relative_to(ROOT):
        return None
    relative = path.relative_to(ROOT).as_posix()
    return relative if relative.startswith(tuple(f"{p}/" for p in PACKAGES)) else None


@contextmanager
def files_run_by_requests() -> Iterator[set[str]]:
    """The files of our packages with a function run within an anchor: while an anchor's frame
    runs, a context variable says so, which the tasks and threads it starts inherit."""
    files: set[str] = set()
    tokens: dict[int, contextvars.Token[bool]] = {}

    def profile(frame: FrameType, event: str, _arg: Any) -> None:
        if event not in ("call", "return"):
            return
        code = frame.f_code
        relative = _ours(code.co_filename)
        if relative is None or code.co_name == "<module>":  # imports are not the path
            return
        if event == "return":
            token = tokens.pop(id(frame), None)
            if token is not None:
                _in_request.reset(token)
            return
        # A coroutine's frame is "called" again each time it resumes.
        if (relative, code.co_name) in ANCHORS and id(frame) not in tokens:
            tokens[id(frame)] = _in_request.set(True)
        if _in_request.get():
            files.add(relative)

    threading.setprofile(profile)
    sys.setprofile(profile)
    try:
        yield files
    finally:
        sys.setprofile(None)
        threading.setprofile(None)  # pyright: ignore[reportArgumentType]


async def test_one_request_runs_through_at_most_fourteen_of_our_files(
    make_memory_settings: WorkerSettingsFactory,
    memory_kafka: MemoryKafka,
    seed_server: SeedServer,
    voice_uri: str,
) -> None:
    settings = make_memory_settings(
        backend=BackendSettings(kind="http", http={"base_url": seed_server.url})
    )
    request = clone_request(voice_uri)
    async with Requests(settings, memory_kafka) as requests:
        await requests.send(request)

    with files_run_by_requests() as files:
        await run_until_idle(settings, memory_kafka)

    async with Outcomes(settings, memory_kafka) as outcomes:
        await outcomes.read_to_end()
    assert isinstance(outcomes.first(request.request_id), AudioReady)
    assert {"consumer/worker.py", "consumer/pipeline.py"} <= files  # the profiler saw the path
    listing = "\n".join(sorted(files))
    assert len(files) <= MOST_FILES, f"{len(files)} files:\n{listing}"
