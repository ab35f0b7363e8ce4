"""The worker's HTTP port: `/metrics`, `/healthz`, `/readyz`, served inside its event loop.

Serving from the worker's own loop is what makes `/healthz` meaningful: if the loop is blocked,
the probe gets no answer. aiohttp is already in every install (modal and aiobotocore use it).
"""

import json

import structlog
from aiohttp import web
from prometheus_client.exposition import choose_encoder

from consumer.observability.health import Health
from consumer.observability.settings import HttpServerSettings
from consumer.telemetry import Metrics

log = structlog.get_logger(__name__)


class ObservabilityServer:
    """Start once after the components it reports on; stop is safe to call twice."""

    def __init__(self, settings: HttpServerSettings, metrics: Metrics, health: Health) -> None:
        self._settings = settings
        self._metrics = metrics
        self._health = health
        self._runner: web.AppRunner | None = None

    @property
    def port(self) -> int:
        """The bound port (the configured one, or the one picked for port 0)."""
        if self._runner is None:
            raise RuntimeError("the observability server is not started")
        return self._runner.addresses[0][1]

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._serve_metrics)
        app.router.add_get("/healthz", self._serve_health)
        app.router.add_get("/readyz", self._serve_readiness)
        # Probes and scrapes every few seconds would drown the worker's own log lines.
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self._settings.host, self._settings.port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise OSError(
                exc.errno,
                f"cannot serve /metrics on {self._settings.host}:{self._settings.port} "
                f"({exc.strerror or exc}); "
                "set VOICECLONE_HTTP__PORT to a free port, or VOICECLONE_HTTP__ENABLED=false",
            ) from exc
        self._runner = runner
        log.info("http_server_started", host=self._settings.host, port=self.port)

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _serve_metrics(self, request: web.Request) -> web.Response:
        encode, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(
            body=encode(self._metrics.registry), headers={"Content-Type": content_type}
        )

    async def _serve_health(self, _: web.Request) -> web.Response:
        # Answering at all proves the event loop turns.
        return web.Response(text="ok\n")

    async def _serve_readiness(self, _: web.Request) -> web.Response:
        readiness = await self._health.check()
        body = {"ready": readiness.ready, "checks": readiness.checks}
        return web.Response(
            text=json.dumps(body) + "\n",
            status=200 if readiness.ready else 503,
            content_type="application/json",
        )
