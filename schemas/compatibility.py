"""Schema Registry compatibility levels (a module of its own: settings import it without
loading the registry client)."""

from enum import StrEnum


class Compatibility(StrEnum):
    """A subject's compatibility level: the registry refuses versions that break it."""

    BACKWARD = "BACKWARD"
    BACKWARD_TRANSITIVE = "BACKWARD_TRANSITIVE"
    FORWARD = "FORWARD"
    FORWARD_TRANSITIVE = "FORWARD_TRANSITIVE"
    FULL = "FULL"
    FULL_TRANSITIVE = "FULL_TRANSITIVE"
    NONE = "NONE"
