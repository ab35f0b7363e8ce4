"""A producer's and a consumer's codec in one wire format, as the tests use them."""

from dataclasses import dataclass

from schemas.codec import Codec, make_codec
from schemas.store import SchemaStore
from schemas.topics import Topics

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
