"""Backend settings, nested into the worker settings as `backend` (env `VOICECLONE_BACKEND__...`).

Model sizes are separate fields rather than a mapping so each can be set from one environment
variable, e.g. `VOICECLONE_BACKEND__MODAL__APP_0_6B=`. A size whose deployment is unset (empty)
is not served: requests for it fail with INVALID_REQUEST and readiness does not check it.
"""

from typing import Annotated, Literal

from pydantic import BaseModel, Field, field_validator

from modal_app.profiles import PROFILES, SERVICE_CLASS_NAME
from producer.caseless import CaseInsensitive
from schemas.vocabulary import ModelSize


def _size_table(one_seven: str | None, zero_six: str | None) -> dict[str, str]:
    """Model size key → configured value, leaving out sizes that are not served."""
    table = {ModelSize.LARGE: one_seven, ModelSize.SMALL: zero_six}
    return {size: value for size, value in table.items() if value}


class ModalBackendSettings(BaseModel):
    """How to reach the deployed Modal GPU service."""

    app_1_7b: str | None = Field(
        default=PROFILES[ModelSize.LARGE].app_name,
        description="Modal app serving the 1.7B model; empty: the 1.7B model is not served.",
    )
    app_0_6b: str | None = Field(
        default=PROFILES[ModelSize.SMALL].app_name,
        description="Modal app serving the 0.6B model; empty: the 0.6B model is not served.",
    )
    class_name: str = Field(
        default=SERVICE_CLASS_NAME,
        description="Name of the Modal class (in each app) that has the `clone` method.",
    )
    environment_name: str | None = Field(
        default=None,
        description="Modal environment of the apps. Unset: the client's default environment.",
    )
    cancel_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        description="Upper bound on cancelling a remote call after a deadline or cancellation.",
    )
    ready_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        description="Upper bound on each app lookup, at start and by the readiness check.",
    )
    ready_cache_seconds: float = Field(
        default=30.0,
        ge=0,
        description="How long a readiness answer is reused before looking up again.",
    )

    def apps(self) -> dict[str, str]:
        """Model size key → Modal app name, for the sizes that are served."""
        return _size_table(self.app_1_7b, self.app_0_6b)


class HttpBackendSettings(BaseModel):
    """How to reach a service speaking the seed's HTTP contract (`POST /clone`)."""

    base_url: str = Field(
        default="http://127.0.0.1:8000",
        description="Base URL of the service, for every model size.",
    )
    base_url_1_7b: str | None = Field(
        default=None, description="Base URL for the 1.7B model, overriding `base_url`."
    )
    base_url_0_6b: str | None = Field(
        default=None, description="Base URL for the 0.6B model, overriding `base_url`."
    )
    max_connections: int = Field(
        default=16,
        ge=1,
        description="Most concurrent connections to the service (all sizes together).",
    )
    connect_timeout_seconds: float = Field(
        default=10.0, gt=0, description="Upper bound on opening one connection to the service."
    )
    ready_timeout_seconds: float = Field(
        default=5.0,
        gt=0,
        description="Upper bound on the `GET /health` done by the readiness check.",
    )

    @field_validator("base_url", "base_url_1_7b", "base_url_0_6b")
    @classmethod
    def _http_scheme(cls, value: str | None) -> str | None:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError(f"must start with http:// or https://, got {value!r}")
        return value

    def base_urls(self) -> dict[str, str]:
        """Model size key → base URL (without a trailing slash)."""
        table = _size_table(
            self.base_url_1_7b or self.base_url, self.base_url_0_6b or self.base_url
        )
        return {size: url.rstrip("/") for size, url in table.items()}


class LocalBackendSettings(BaseModel):
    """The in-process engine (needs the `engine` extra: torch, qwen-tts)."""

    model_1_7b: str | None = Field(
        default=PROFILES[ModelSize.LARGE].repo_id,
        description="Local directory of the 1.7B weights, or a hub id already in the Hugging "
        "Face cache (never downloaded); empty: not served.",
    )
    model_0_6b: str | None = Field(
        default=PROFILES[ModelSize.SMALL].repo_id,
        description="Local directory of the 0.6B weights, or a hub id already in the Hugging "
        "Face cache (never downloaded); empty: not served.",
    )
    device: str = Field(
        default="auto",
        pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$",
        description='Torch device for inference: "auto" (CUDA when present, else CPU), "cpu", '
        '"cuda", "cuda:1", "mps".',
    )
    threads: int | None = Field(
        default=None, ge=1, description="CPU threads for torch. Unset: torch's default."
    )
    generation: Annotated[Literal["stock", "fast"], CaseInsensitive()] = Field(
        default="stock",
        description='Generation loop: "stock" (qwen-tts\'s, one request at a time) or "fast" '
        "(all in-flight requests' sentences generated in one continuous batch; static caches, "
        "CUDA graphs; same inputs and outputs).",
    )
    max_concurrent: int = Field(
        default=16,
        ge=1,
        description="Requests one engine takes at once (each on a thread of its own); with "
        '"fast" generation they share its batch, with "stock" they queue for it.',
    )

    def models(self) -> dict[str, str]:
        """Model size key → weights (hub id or path), for the sizes that are served."""
        return _size_table(self.model_1_7b, self.model_0_6b)


class BackendSettings(BaseModel):
    """Which backend runs the voice cloning, and its options."""

    kind: Annotated[Literal["modal", "http", "local"], CaseInsensitive()] = Field(
        default="modal",
        description="Backend: `modal` (deployed GPU service), `http` (a service speaking the "
        "seed's HTTP contract) or `local` (in-process engine).",
    )
    timeout_seconds: float = Field(
        default=600.0,
        gt=0,
        description="Upper bound on one clone call; a request's own deadline may cut it shorter.",
    )
    modal: ModalBackendSettings = Field(
        default_factory=ModalBackendSettings, description="Options of the `modal` backend."
    )
    http: HttpBackendSettings = Field(
        default_factory=HttpBackendSettings, description="Options of the `http` backend."
    )
    local: LocalBackendSettings = Field(
        default_factory=LocalBackendSettings, description="Options of the `local` backend."
    )

    @field_validator("kind", mode="before")
    @classmethod
    def _lowercase_kind(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value
