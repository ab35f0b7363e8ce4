"""Voice-cloning backends behind one small interface (`Backend`), built by `make_backend`.

Implementations: `modal` (the deployed GPU service, the default), `http` (a service speaking
the seed's HTTP contract) and `local` (the same engine as the Modal service, run in this process;
needs the `engine` extra, imported only when that backend is built). Every failure they report
is a `VoicecloneError` (`consumer.backends.errors`).
"""

from consumer.backends.base import (
    Backend,
    CloneJob,
    CloneResult,
    GenerationParams,
)
from consumer.backends.errors import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    ErrorCode,
    GenerationFailed,
    InvalidInput,
)
from consumer.backends.factory import BACKENDS, make_backend
from consumer.backends.settings import (
    BackendSettings,
    HttpBackendSettings,
    LocalBackendSettings,
    ModalBackendSettings,
)

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendError",
    "BackendSettings",
    "BackendTimeout",
    "BackendUnavailable",
    "CloneJob",
    "CloneResult",
    "ErrorCode",
    "GenerationFailed",
    "GenerationParams",
    "HttpBackendSettings",
    "InvalidInput",
    "LocalBackendSettings",
    "ModalBackendSettings",
    "make_backend",
]
