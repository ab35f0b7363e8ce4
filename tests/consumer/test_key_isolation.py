"""A request names only its own objects: whatever its tenant and request ids, the audio it
produces cannot land on a reference the client uploaded, and no other tenant's audio can be its
voice; on a local directory and on S3 (MinIO). Through the pipeline with the real upload of
`voiceclone request` and the seed HTTP service."""

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from consumer.backends import BackendSettings
from consumer.backends.http import HttpBackend
from consumer.errors import CloneError
from consumer.pipeline import Pipeline
from consumer.reference import ReferenceFetcher, ReferenceSettings
from consumer.settings import LimitSettings
from producer.client import upload_reference
from producer.storage import LocalStorage, Storage, object_key
from schemas.events import AudioFormat, ErrorCode
from tests.fixtures.seed import SeedServer
from tests.fixtures.worker import clone_request
from tests.producer.test_storage import storage, storage_kind  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(120)

MAX_BYTES = 10_000_000


@pytest.fixture
async def pipeline(
    seed_server: SeedServer,
    storage: Storage,  # noqa: F811
    tmp_path: Path,
) -> AsyncIterator[Pipeline]:
    """A worker's pipeline that reads uploaded references as the demo worker does: `file://`
    inside the local storage's references, `s3://` through the storage."""
    file_root = (storage.root if isinstance(storage, LocalStorage) else tmp_path) / "references"
    file_root.mkdir(parents=True, exist_ok=True)
    references = ReferenceSettings(allowed_schemes=["file", "s3"], file_root=file_root)
    backend = HttpBackend(BackendSettings(kind="http", http={"base_url": seed_server.url}))
    await backend.start()
    async with ReferenceFetcher(references, object_reader=storage) as fetcher:
        yield Pipeline(LimitSettings(), fetcher, backend, storage)
    await backend.close()


async def uploaded(storage: Storage, tmp_path: Path, name: str, audio: bytes) -> tuple[str, str]:  # noqa: F811
    """A recording uploaded as `voiceclone request --reference` does: its URI and SHA-256."""
    path = tmp_path / name
    path.write_bytes(audio)
    return await upload_reference(storage, path)


async def test_a_request_named_after_an_uploaded_voice_leaves_that_voice_alone(
    pipeline: Pipeline,
    storage: Storage,  # noqa: F811
    tmp_path: Path,
    make_reference_wav: Callable[..., bytes],
) -> None:
    victim_audio, attacker_audio = make_reference_wav(1), make_reference_wav(2)
    victim_uri, victim_sha = await uploaded(storage, tmp_path, "victim.wav", victim_audio)
    attacker_uri, _ = await uploaded(storage, tmp_path, "attacker.wav", attacker_audio)

    # "references" is a valid tenant id and a SHA-256 a valid request id; the output's format
    # is the uploaded recording's.
    attack = clone_request(
        attacker_uri, tenant_id="references", request_id=victim_sha, output_format=AudioFormat.WAV
    )
    await pipeline.process(attack)

    assert await storage.read(victim_uri, MAX_BYTES) == victim_audio
    # The victim's own requests pin the recording's checksum: they still get their voice.
    victim_request = clone_request(victim_uri)
    pinned = victim_request.voice.model_copy(update={"reference_audio_sha256": victim_sha})
    ready = await pipeline.process(victim_request.model_copy(update={"voice": pinned}))
    assert ready.request_id == victim_request.request_id


async def test_another_tenants_audio_cannot_be_a_voice(
    pipeline: Pipeline,
    storage: Storage,  # noqa: F811
    seed_server: SeedServer,
    tmp_path: Path,
    reference_wav: bytes,
) -> None:
    voice_uri, _ = await uploaded(storage, tmp_path, "voice.wav", reference_wav)
    theirs = await pipeline.process(clone_request(voice_uri, tenant_id="tenant-b"))
    info = await storage.head(object_key("tenant-b", theirs.request_id, "wav"))
    assert info is not None

    with pytest.raises(CloneError) as raised:
        await pipeline.process(clone_request(info.storage_uri, tenant_id="tenant-a"))

    assert raised.value.code == ErrorCode.REFERENCE_AUDIO_UNAVAILABLE
    assert not raised.value.transient
    assert len(seed_server.requests) == 1  # theirs only
