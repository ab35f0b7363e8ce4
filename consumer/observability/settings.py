"""Settings of the worker's HTTP port, nested into the worker settings as `http`."""

from pydantic import BaseModel, Field


class HttpServerSettings(BaseModel):
    """The worker's own HTTP server: `/metrics`, `/healthz`, `/readyz`."""

    enabled: bool = Field(default=True, description="Serve `/metrics`, `/healthz` and `/readyz`.")
    host: str = Field(
        default="0.0.0.0",  # scraped and probed from outside the container or pod
        description="Address the HTTP server listens on.",
    )
    port: int = Field(
        default=8080,
        ge=0,
        le=65535,
        description="Port of the HTTP server; 0: any free port (logged).",
    )
    progress_timeout_seconds: float = Field(
        default=60.0,
        gt=0,
        description="`/readyz` fails when the consume loop has not polled for this long.",
    )
    backend_check_timeout_seconds: float = Field(
        default=5.0, gt=0, description="Upper bound on the backend check done by `/readyz`."
    )
