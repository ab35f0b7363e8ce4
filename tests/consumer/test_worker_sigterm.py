"""`voiceclone worker` as a process, configured by environment variables: SIGTERM under load
drains what is in flight and exits 0; a second worker of the group then finishes the rest."""

import signal
import time
from pathlib import Path

import pytest

from consumer.backends import BackendSettings
from consumer.settings import WorkerSettings
from schemas.events import AudioReady
from tests.fixtures.process import settings_env, worker_process
from tests.fixtures.seed import SeedServer
from tests.fixtures.worker import (
    Outcomes,
    Requests,
    WorkerSettingsFactory,
    clone_request,
    group_lag,
    running_worker,
)

pytestmark = pytest.mark.timeout(180)

SHUTDOWN_GRACE_S = 10


def test_settings_env_configures_the_same_settings(
    make_memory_settings: WorkerSettingsFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_memory_settings(backend=BackendSettings(kind="http"), max_in_flight=3)
    for name, value in settings_env(settings).items():
        monkeypatch.setenv(name, value)

    assert WorkerSettings() == settings


async def test_sigterm_under_load_drains_and_a_second_worker_finishes_the_rest(
    make_worker_settings: WorkerSettingsFactory,
    seed_server: SeedServer,
    reference_root: Path,
) -> None:
    seed_server.delay_seconds = 0.5
    settings = make_worker_settings(
        backend=BackendSettings(kind="http", http={"base_url": seed_server.url}),
        max_in_flight=4,
        shutdown_grace_seconds=SHUTDOWN_GRACE_S,
    )
    voice = (reference_root / "voice.wav").as_uri()
    batch = [clone_request(voice) for _ in range(40)]
    ids = [request.request_id for request in batch]

    async with (
        Requests(settings) as requests,
        Outcomes(settings) as outcomes,
    ):
        async with worker_process(settings) as first:
            await first.wait_for_log("partitions_assigned")
            await requests.send(*batch)
            # Its second round has just started: each takes half a second, so they are running.
            await first.wait_for_log("record_started", count=settings.max_in_flight + 1)
            first.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            code = await first.exit_code(within_s=SHUTDOWN_GRACE_S + 10)
            exited_after = time.monotonic() - signalled

        assert code == 0, first.logs[-5:]
        assert exited_after < SHUTDOWN_GRACE_S
        (draining,) = first.events("worker_draining")
        assert draining["in_flight"] > 0  # it stopped under load, with requests still running
        finished_by_first = {entry["request_id"] for entry in first.events("outcome_published")}
        assert 0 < len(finished_by_first) < len(batch)
        in_flight = [entry["in_flight"] for entry in first.events("record_started")]
        assert max(in_flight) <= settings.max_in_flight

        async with running_worker(settings):
            await outcomes.wait_for(ids, within_s=60)

    assert all(isinstance(outcomes.first(rid), AudioReady) for rid in ids)
    # The first worker committed all it published before leaving: nothing was done twice.
    assert outcomes.duplicates() == {}
    lag = await group_lag(
        settings.kafka.bootstrap_servers, settings.group_id, settings.topics.requests
    )
    assert set(lag.values()) == {0}, lag
