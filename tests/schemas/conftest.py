"""Fixtures for the codec tests: codecs in both wire formats (registry mode on the session's
real registry), and the fake registry for the faults a real one cannot be made to produce."""

from collections.abc import Iterator

import httpx
import pytest

from schemas.registry import subject_for
from schemas.topics import Topics
from schemas.wire_format import make_codec
from tests.schemas.fake_registry import FakeSchemaRegistry
from tests.schemas.pairs import MODES, CodecPair


@pytest.fixture
def registry() -> Iterator[FakeSchemaRegistry]:
    """The fake: it counts requests and answers any HTTP status asked of it (fail_with)."""
    fake = FakeSchemaRegistry()
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def topics() -> Topics:
    return Topics()


@pytest.fixture(params=MODES)
def codecs(request: pytest.FixtureRequest, topics: Topics) -> CodecPair:
    """Writer and reader codecs, once per wire format; registry mode on the session registry
    (the writer registers the product's schemas under the default topics' subjects)."""
    if request.param == "schemaless":
        return CodecPair("schemaless", make_codec(topics=topics), make_codec(topics=topics), None)
    url = request.getfixturevalue("schema_registry_url")
    allow_any_version(url, topics)
    writer, reader = make_codec(url, topics=topics), make_codec(url, topics=topics)
    return CodecPair("registry", writer, reader, url)


def allow_any_version(url: str, topics: Topics) -> None:
    """Compatibility NONE on the topics' subjects: these tests register versions that a level
    would refuse (test_incompatible_writer_gives_typed_error), whatever ran before them.
    Apicurio answers 404 for a subject that has no rule to drop: fine."""
    for topic in topics.all():
        response = httpx.put(f"{url}/config/{subject_for(topic)}", json={"compatibility": "NONE"})
        if response.status_code != 404:
            response.raise_for_status()
