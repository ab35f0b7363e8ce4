"""The object store down for longer than a request's first storage attempts, and back under
load: every request either waits it out and completes (its object there, with its sha256) or,
after its whole retry budget, fails as STORAGE_FAILED (retryable), never lost. The
`voiceclone_retries_total{reason="storage"}` metric and the `retrying` log lines say so."""

import asyncio
import time
from pathlib import Path

from structlog.testing import capture_logs

from consumer.backends import BackendSettings
from consumer.settings import RetrySettings
from producer.client import download_audio
from producer.storage import StorageSettings
from schemas.events import AudioReady, CloneFailed, ErrorCode
from tests.fixtures.memory_kafka import MemoryKafka
from tests.fixtures.s3 import OwnS3, storage_settings_on
from tests.fixtures.seed import SeedServer
from tests.fixtures.worker import (
    Outcomes,
    Requests,
    WorkerSettingsFactory,
    clone_request,
    running_worker,
    scrape_worker,
)

REQUESTS = 40
# Waits of 0.25, 0.5, 1, 2 and 2 s, each jittered to 50-100 %: the budget lasts 2.9 to 5.8 s.
RETRY = RetrySettings(max_attempts=6, initial_backoff_seconds=0.25, max_backoff_seconds=2.0)
OUTAGE_S = 5.0  # past the first attempts of every request in flight; some budgets outlast it


def s3_settings(own_s3: OwnS3) -> StorageSettings:
    server = own_s3.server
    # No retries inside botocore: the worker's budget is the only one.
    return storage_settings_on(server, server.create_bucket(), max_attempts=1)


async def test_an_object_store_outage_is_waited_out_or_failed_after_the_budget(
    make_memory_settings: WorkerSettingsFactory,
    memory_kafka: MemoryKafka,
    seed_server: SeedServer,
    own_s3: OwnS3,
    voice_uri: str,
    unused_tcp_port: int,
    tmp_path: Path,
) -> None:
    settings = make_memory_settings(
        backend=BackendSettings(kind="http", http={"base_url": seed_server.url}),
        storage=s3_settings(own_s3),
        retry=RETRY,
        max_in_flight=4,
        http={"host": "127.0.0.1", "port": unused_tcp_port},
    )
    seed_server.delay_seconds = 0.1
    batch = [clone_request(voice_uri) for _ in range(REQUESTS)]
    ids = [request.request_id for request in batch]

    with capture_logs() as logs:
        async with (
            Requests(settings, memory_kafka) as requests,
            Outcomes(settings, memory_kafka) as outcomes,
            running_worker(settings, memory_kafka),
        ):
            await requests.send(*batch)
            await outcomes.wait_for(ids[:4])  # under load
            await asyncio.to_thread(own_s3.stop)
            stopped = time.monotonic()
            await asyncio.sleep(OUTAGE_S)
            await asyncio.to_thread(own_s3.start)
            outage = time.monotonic() - stopped
            await outcomes.wait_for(ids, within_s=60)
            scrape = await scrape_worker(settings)

    answered = [outcomes.first(request_id) for request_id in ids]  # none lost
    failed = [o for o in answered if isinstance(o, CloneFailed)]
    ready = [o for o in answered if isinstance(o, AudioReady)]
    waited = {e["what"].rpartition(" ")[2] for e in logs if e["event"] == "retrying"}
    waited_and_done = [o for o in ready if o.request_id in waited]
    storage_retries = [
        e for e in logs if e["event"] == "retrying" and e["what"].startswith("storage")
    ]
    summary = (
        f"storage-outage: requests={REQUESTS} outage_s={outage:.1f} ready={len(ready)} "
        f"waited_and_done={len(waited_and_done)} storage_failed={len(failed)} "
        f"storage_retries={len(storage_retries)} lost=0"
    )
    print(f"\n{summary}")
    assert outage >= OUTAGE_S
    assert outcomes.duplicates() == {}, summary
    assert len(failed) + len(ready) == REQUESTS, summary
    for failure in failed:  # only after the whole budget
        assert (failure.error_code, failure.retryable) == (ErrorCode.STORAGE_FAILED, True), failure
        assert failure.attempts == RETRY.max_attempts, failure
    assert waited_and_done, f"no request waited the outage out; {summary}"
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    for outcome in ready:  # each object is there, with the bytes its sha256 names
        await download_audio(outcome, downloads)
    metric = scrape.value("voiceclone_retries_total", reason="storage")
    assert metric == len(storage_retries) > 0, summary
