"""Build the configured backend.

Constructors import their backend lazily so that choosing one never imports another's heavy
dependencies (the `local` engine needs torch).
"""

from collections.abc import Callable

from consumer.backends.base import Backend
from consumer.backends.settings import BackendSettings

BackendFactory = Callable[[BackendSettings], Backend]


def _modal(settings: BackendSettings) -> Backend:
    from consumer.backends.modal import ModalBackend

    return ModalBackend(settings)


def _http(settings: BackendSettings) -> Backend:
    from consumer.backends.http import HttpBackend

    return HttpBackend(settings)


def _local(settings: BackendSettings) -> Backend:
    from consumer.backends.local import LocalBackend

    return LocalBackend(settings)


# Backend kind → constructor; a kind missing here is rejected by `make_backend`.
BACKENDS: dict[str, BackendFactory] = {"modal": _modal, "http": _http, "local": _local}


def make_backend(settings: BackendSettings) -> Backend:
    """The backend `settings.kind` names, constructed but not started."""
    factory = BACKENDS.get(settings.kind)
    if factory is None:
        available = ", ".join(sorted(BACKENDS))
        raise ValueError(
            f"backend kind {settings.kind!r} is not available; choose one of: {available}"
        )
    return factory(settings)
