"""A producer's and a consumer's codec in one wire format, as the tests use them."""

from dataclasses import dataclass

from schemas.codec import Codec, SchemaStore
from schemas.topics import Topics
from schemas.wire_format import make_codec

MODES = ["schemaless", "registry"]


@dataclass
class CodecPair:
    """Separate writer and reader codecs (no shared caches), one wire format."""

    mode: str
    writer: Codec
    reader: Codec
    registry_url: str | None  # set in registry mode

    def make(self, store: SchemaStore | None = None, **options: int) -> Codec:
        """Another codec of this pair's mode (e.g. with an extended store)."""
        return make_codec(self.registry_url, topics=Topics(), store=store, **options)
