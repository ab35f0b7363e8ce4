"""The worker's HTTP port and the readiness facts behind it.

`server.ObservabilityServer` serves `/metrics`, `/healthz` and `/readyz`; `health.Health` reads,
when asked, what readiness is computed from; `settings.HttpServerSettings` configures the port.
The metrics themselves live in `consumer.telemetry`. Nothing is imported here, so reading the
settings stays cheap.
"""
