"""The `http` backend: a service speaking the seed's HTTP contract (`POST /clone`).

The contract carries no x-vector mode (it requires `ref_text`) and, of the generation
parameters, only `max_new_tokens`; see `clone_request_body`.
"""

import asyncio
import base64
from typing import Any

import httpx

from consumer.backends.base import CloneJob, CloneResult
from consumer.backends.errors import (
    BackendTimeout,
    BackendUnavailable,
    GenerationFailed,
    InvalidInput,
    invalid_input_from_message,
)
from consumer.backends.settings import BackendSettings
from schemas.vocabulary import VoicecloneError

# Statuses whose body describes what is wrong with the request.
_REJECTED = frozenset({400, 413, 422})
# Statuses that say "not now": overload, gateways, proxies timing out.
_BUSY = frozenset({408, 429, 502, 503, 504})


class HttpBackend:
    """Clones through `POST {base_url}/clone` over one shared connection pool."""

    name = "http"

    def __init__(self, settings: BackendSettings) -> None:
        self._settings = settings
        self.timeout_seconds = settings.timeout_seconds
        self._urls = settings.http.base_urls()
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        if self._client is None:
            size = self._settings.http.max_connections
            limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
            self._client = httpx.AsyncClient(limits=limits)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def ready(self) -> bool:
        if self._client is None:
            return False
        limit = self._settings.http.ready_timeout_seconds
        checks = [self._healthy(url, limit) for url in sorted(set(self._urls.values()))]
        return all(await asyncio.gather(*checks))

    async def clone(self, job: CloneJob, timeout: float) -> CloneResult:  # noqa: ASYNC109
        url = f"{self._base_url(job.model)}/clone"
        body = clone_request_body(job)
        response = await self._post(url, body, timeout)
        if not response.is_success:
            raise error_for_response(response)
        return CloneResult(
            audio=response.content,
            cold_start=None,  # the contract does not say
            model_load_seconds=None,
            container_id=None,
            inference_seconds=None,
        )

    def _base_url(self, model: str) -> str:
        url = self._urls.get(model)
        if url is None:
            raise InvalidInput(f"model {model!r} is not served by this worker")
        return url

    async def _post(self, url: str, body: dict[str, Any], budget: float) -> httpx.Response:
        # httpx's timeouts bound each phase; asyncio.timeout bounds the whole call, so a
        # server trickling bytes cannot stretch it past the deadline.
        connect = min(budget, self._settings.http.connect_timeout_seconds)
        try:
            async with asyncio.timeout(budget):
                return await self._started().post(
                    url, json=body, timeout=httpx.Timeout(budget, connect=connect)
                )
        except TimeoutError as exc:
            raise BackendTimeout(f"no answer from {url} within {budget:.1f} s") from exc
        except httpx.HTTPError as exc:
            raise error_for_transport(url, exc) from exc

    async def _healthy(self, base_url: str, limit: float) -> bool:
        try:
            response = await self._started().get(f"{base_url}/health", timeout=limit)
        except httpx.HTTPError:
            return False
        return response.is_success

    def _started(self) -> httpx.AsyncClient:
        if self._client is None:
            raise RuntimeError("HttpBackend.start() must be awaited before use")
        return self._client


def clone_request_body(job: CloneJob) -> dict[str, Any]:
    """The seed's `/clone` JSON body for `job`.

    The seed has no x-vector-only mode and rejects an empty `ref_text`, so a job without a
    reference transcript is refused here rather than sent. Reference audio travels inline as
    base64, so the service needs no access to where it was fetched from.
    """
    if job.reference_text is None:
        raise InvalidInput(
            "the http backend needs reference_text: its /clone contract has no x-vector-only "
            "mode (use the modal or local backend for that)"
        )
    body: dict[str, Any] = {
        "text": job.text,
        "language": job.language,
        "ref_audio_base64": base64.b64encode(job.reference_audio).decode("ascii"),
        "ref_text": job.reference_text,
    }
    if job.generation.max_new_tokens is not None:
        body["max_new_tokens"] = job.generation.max_new_tokens
    return body


def error_for_response(response: httpx.Response) -> VoicecloneError:
    """Our error for a non-2xx answer from `/clone`."""
    status, detail = response.status_code, _detail(response)
    if status in _REJECTED:
        return invalid_input_from_message(detail)
    if status == 500:  # the seed's "Generation failed: ..."
        return GenerationFailed(detail)
    if status in _BUSY or status > 500:
        return BackendUnavailable(f"HTTP {status} from {response.url}: {detail}")
    # 401, 403, 404, 405...: pointed at the wrong place or without access.
    return BackendUnavailable(f"HTTP {status} from {response.url}: {detail}", transient=False)


def error_for_transport(url: str, exc: httpx.HTTPError) -> VoicecloneError:
    """Our error for a request that got no HTTP answer."""
    if isinstance(exc, httpx.ConnectTimeout):
        return BackendUnavailable(f"could not connect to {url} in time")
    if isinstance(exc, httpx.TimeoutException):  # read, write or waiting for a pooled connection
        return BackendTimeout(f"no answer from {url} in time ({type(exc).__name__})")
    if isinstance(exc, httpx.UnsupportedProtocol):
        return BackendUnavailable(f"cannot call {url}: {exc}", transient=False)
    return BackendUnavailable(f"cannot reach {url}: {type(exc).__name__}: {exc}")


def _detail(response: httpx.Response) -> str:
    """The `detail` of a FastAPI-style error body, or the body's start."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    if detail is None:
        return response.text[:500] or response.reason_phrase
    return detail if isinstance(detail, str) else str(detail)
