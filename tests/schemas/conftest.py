"""Fixtures for the codec tests: a fake schema registry, and codecs in both wire formats."""

from collections.abc import Iterator

import pytest

from schemas.codec import make_codec
from schemas.topics import Topics
from tests.schemas.fake_registry import FakeSchemaRegistry
from tests.schemas.pairs import MODES, CodecPair


@pytest.fixture
def registry() -> Iterator[FakeSchemaRegistry]:
    fake = FakeSchemaRegistry()
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def topics() -> Topics:
    return Topics()


@pytest.fixture(params=MODES)
def codecs(request: pytest.FixtureRequest, topics: Topics) -> Iterator[CodecPair]:
    """Writer and reader codecs, once per wire format (registry mode gets its own registry)."""
    if request.param == "schemaless":
        yield CodecPair("schemaless", make_codec(topics=topics), make_codec(topics=topics), None)
        return
    fake = FakeSchemaRegistry()
    fake.start()
    try:
        writer = make_codec(fake.url, topics=topics)
        yield CodecPair("registry", writer, make_codec(fake.url, topics=topics), fake)
    finally:
        fake.stop()
