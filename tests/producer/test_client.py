"""The client library against a real broker: sending, waiting, following, downloading; what it
sends, on Kafka in memory."""

import asyncio
import gc
import hashlib
import http.server
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import cast

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError

from producer.client import DownloadError, VoiceCloneClient, download_audio
from producer.settings import ClientSettings, KafkaSettings
from schemas.events import AudioReady, CloneRequest
from schemas.topics import Topics
from schemas.wire_format import make_codec
from tests.fixtures.memory_kafka import MemoryKafka
from tests.producer.outcomes import client_settings, clone_failed, publish, stored_audio_ready

AUDIO = b"RIFF" + bytes(range(256)) * 8
_EPOCH = datetime.fromtimestamp(0, UTC)


@pytest.fixture
def settings(kafka_bootstrap: str, worker_topics: Topics, tmp_path: Path) -> ClientSettings:
    return client_settings(kafka_bootstrap, worker_topics, tmp_path / "storage")


@pytest.fixture
async def client(settings: ClientSettings) -> AsyncIterator[VoiceCloneClient]:
    async with VoiceCloneClient(settings) as client:
        yield client


def new_id() -> str:
    return uuid.uuid4().hex


async def test_a_uri_reference_is_sent_as_given_without_uploading(tmp_path: Path) -> None:
    kafka = MemoryKafka()  # what is sent is the point here, not the broker
    settings = client_settings("in-memory", kafka.create_worker_topics(), tmp_path / "storage")
    producer = cast(AIOKafkaProducer, kafka.producer())

    async with VoiceCloneClient(settings, producer=producer) as client:
        request_id = await client.request(
            "Hello.", "s3://voices/anna.wav", reference_text="Hi.", request_id="r-1"
        )

    (record,) = kafka.records(settings.topics.requests)
    sent = await make_codec().decode(record.topic, record.value, record.headers)
    assert isinstance(sent, CloneRequest)
    assert request_id == sent.request_id == "r-1"
    assert record.key == b"r-1"
    assert sent.voice.reference_audio_uri == "s3://voices/anna.wav"
    assert sent.voice.reference_audio_sha256 is None
    assert not (tmp_path / "storage").exists()  # nothing was uploaded


async def test_wait_returns_the_outcome_of_its_own_request(
    client: VoiceCloneClient, settings: ClientSettings, tmp_path: Path
) -> None:
    mine, other = new_id(), new_id()
    others_ready = await stored_audio_ready(tmp_path / "storage", other, AUDIO)
    ready = await stored_audio_ready(tmp_path / "storage", mine, AUDIO)
    await publish(settings, clone_failed(other), others_ready, ready)

    outcome = await client.wait(mine, timeout=15)

    assert outcome == ready


async def test_wait_gives_up_after_its_timeout(client: VoiceCloneClient) -> None:
    request_id = new_id()
    started = time.monotonic()

    with pytest.raises(TimeoutError, match=f"no outcome for {request_id} within 1 s"):
        await client.wait(request_id, timeout=1)

    assert 1 <= time.monotonic() - started < 10


async def test_follow_from_now_skips_older_outcomes_and_misses_none_published_after_entering(
    client: VoiceCloneClient, settings: ClientSettings
) -> None:
    old, new = new_id(), new_id()
    await publish(settings, clone_failed(old))
    await asyncio.sleep(0.05)  # record timestamps are in milliseconds

    async with client.follow(since=datetime.now(UTC)) as outcomes:
        await publish(settings, clone_failed(new))
        async with asyncio.timeout(15):
            first = await anext(outcomes)

    assert first.request_id == new


def unreachable_settings() -> ClientSettings:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return ClientSettings(kafka=KafkaSettings(bootstrap_servers=f"127.0.0.1:{port}"))


async def unclosed_after(attempt: Callable[[], Awaitable[None]]) -> list[str]:
    """What aiokafka reports as left open ("Unclosed AIOKafka...") once `attempt`, a connect
    that must fail, has failed and its objects are collected."""
    reported: list[str] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: reported.append(context["message"]))
    try:
        with pytest.raises(KafkaConnectionError):
            await attempt()
        gc.collect()  # the traceback, which holds the failed client, is gone by now
    finally:
        loop.set_exception_handler(None)
    return reported


async def test_a_client_that_cannot_connect_closes_its_producer() -> None:
    async def enter() -> None:
        async with VoiceCloneClient(unreachable_settings()):
            pass

    assert await unclosed_after(enter) == []


async def test_a_follow_that_cannot_connect_stops_its_consumer() -> None:
    client = VoiceCloneClient(unreachable_settings())

    async def follow() -> None:
        async with client.follow():
            pass

    try:
        assert await unclosed_after(follow) == []
    finally:
        await client.close()


async def test_download_audio_copies_a_file_url_and_names_it_after_the_request(
    tmp_path: Path,
) -> None:
    ready = await stored_audio_ready(tmp_path / "storage", "req-7", AUDIO)

    saved = await download_audio(ready, tmp_path / "out")

    assert saved == tmp_path / "out" / "req-7.wav"
    assert saved.read_bytes() == AUDIO
    assert [p.name for p in saved.parent.iterdir()] == ["req-7.wav"]  # no partial left over


async def test_download_audio_refuses_bytes_that_do_not_match_the_event(tmp_path: Path) -> None:
    ready = await stored_audio_ready(tmp_path / "storage", "req-8", AUDIO)
    tampered = ready.model_copy(update={"sha256": hashlib.sha256(b"other").hexdigest()})

    with pytest.raises(DownloadError, match="sha256"):
        await download_audio(tampered, tmp_path / "out")

    assert not (tmp_path / "out").exists()


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A directory served over HTTP on 127.0.0.1: (directory, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


async def test_download_audio_fetches_http_urls(
    tmp_path: Path, http_root: tuple[Path, str]
) -> None:
    root, base_url = http_root
    (root / "a.wav").write_bytes(AUDIO)
    ready = await stored_audio_ready(tmp_path / "storage", "req-9", AUDIO)
    served = ready.model_copy(update={"audio_url": f"{base_url}/a.wav?X-Amz-Signature=secret"})

    saved = await download_audio(served, tmp_path / "out")

    assert saved == tmp_path / "out" / "req-9.wav"
    assert saved.read_bytes() == AUDIO


async def test_download_audio_reports_http_errors_without_the_signature(
    tmp_path: Path, http_root: tuple[Path, str]
) -> None:
    _, base_url = http_root
    ready = await stored_audio_ready(tmp_path / "storage", "req-10", AUDIO)
    missing: AudioReady = ready.model_copy(
        update={"audio_url": f"{base_url}/gone.wav?X-Amz-Signature=secret"}
    )

    with pytest.raises(DownloadError, match="404") as caught:
        await download_audio(missing, tmp_path / "out")

    assert "secret" not in str(caught.value)
