"""`voiceclone worker` with the local engine writes JSON log lines and nothing else, from its
start (torch, qwen-tts and their libraries imported) through a request to its exit: a log
collector parsing its output line by line never meets plain text."""

import signal
from pathlib import Path

import pytest

from consumer.backends import BackendSettings, LocalBackendSettings
from schemas.events import AudioReady
from tests.fixtures.process import worker_process
from tests.fixtures.worker import Outcomes, Requests, WorkerSettingsFactory, clone_request

pytestmark = [pytest.mark.engine, pytest.mark.timeout(300)]


async def test_a_local_engine_worker_writes_only_json_lines(
    make_worker_settings: WorkerSettingsFactory, tiny_model_dir: Path, voice_uri: str
) -> None:
    local = LocalBackendSettings(model_1_7b=str(tiny_model_dir), model_0_6b="", device="cpu")
    settings = make_worker_settings(backend=BackendSettings(kind="local", local=local))
    request = clone_request(voice_uri)

    # At DEBUG, the most there is: the libraries' import-time chatter is logged at DEBUG.
    async with (
        Requests(settings) as requests,
        Outcomes(settings) as outcomes,
        worker_process(settings, log_level="debug") as worker,
    ):
        await worker.wait_for_log("worker_started", within_s=240)
        await requests.send(request)
        await outcomes.wait_for([request.request_id], within_s=60)
        worker.process.send_signal(signal.SIGTERM)
        assert await worker.exit_code(within_s=30) == 0

    assert isinstance(outcomes.first(request.request_id), AudioReady)
    assert worker.events("worker_stopped")
    assert worker.stray == []
