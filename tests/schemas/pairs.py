"""A producer's and a consumer's codec in one wire format, as the tests use them."""

from dataclasses import dataclass

from schemas.codec import Codec, make_codec
from schemas.store import SchemaStore
from schemas.topics import Topics
from tests.schemas.fake_registry import FakeSchemaRegistry

MODES = ["schemaless", "registry"]


@dataclass
class CodecPair:
    """Separate writer and reader codecs (no shared caches), one wire format."""

    mode: str
    writer: Codec
    reader: Codec
    registry: FakeSchemaRegistry | None  # set in registry mode

    def make(self, store: SchemaStore | None = None, **options: int) -> Codec:
        """Another codec of this pair's mode (e.g. with an extended store)."""
        url = self.registry.url if self.registry is not None else None
        return make_codec(url, topics=Topics(), store=store, **options)
