"""The `modal` backend: the deployed GPU service, one Modal app per model size.

Each call is spawned and then awaited with the worker's own deadline, because Modal keeps
retrying a crash-looping deployment forever: the caller is the one that must give up. Whenever
the worker gives up (deadline, cancellation, lost contact) it cancels the remote call too, so
no GPU keeps working for a request nobody waits for.

The remote contract (`Qwen3TTSService.clone`):
    clone(text, language, reference_audio: bytes, reference_text: str | None,
          output_format, generation: dict | None, request_id) -> modal_app.contract.ServiceResult
(or, from a service deployed before that class, a dict of the same names).
"""

import asyncio
from collections.abc import Coroutine, Mapping
from typing import Any

import modal
import modal.exception
import structlog

from consumer.backends.base import CloneJob, CloneResult
from consumer.backends.errors import (
    BackendTimeout,
    BackendUnavailable,
    GenerationFailed,
    InvalidInput,
)
from consumer.backends.modal_errors import translate_modal_error
from consumer.backends.settings import BackendSettings, ModalBackendSettings
from modal_app.contract import ServiceResult
from schemas.vocabulary import VoicecloneError

log = structlog.get_logger(__name__)

# Modal's own exception for an input cancelled elsewhere is a BaseException.
_CALL_FAILURES = (Exception, modal.exception.InputCancellation)


class ModalBackend:
    """Clones through `Cls.from_name(app, class).clone.spawn` with a caller-side deadline."""

    name = "modal"

    def __init__(self, settings: BackendSettings) -> None:
        self.timeout_seconds = settings.timeout_seconds
        self._modal = settings.modal
        self._apps = settings.modal.apps()
        self._services: dict[str, Any] = {}  # model size → instance of the deployed class
        self._cancels: set[asyncio.Task[None]] = set()
        self._readiness = _Readiness(settings)

    async def start(self) -> None:
        """Look up every served app once, so a worker without Modal credentials or with an app
        not deployed fails at start (`BackendUnavailable`) rather than on every request.
        Calls still look their app up lazily, on first use."""
        apps = sorted(set(self._apps.values()))
        found = await asyncio.gather(
            *(look_up(self._modal, app) for app in apps), return_exceptions=True
        )
        for app, result in zip(apps, found, strict=True):
            if isinstance(result, VoicecloneError):
                raise BackendUnavailable(
                    f"the modal backend cannot look up the app {app!r}: {result}. "
                    f"{_start_hint(result)}",
                    transient=result.transient,
                ) from result
            if isinstance(result, BaseException):
                raise result

    async def close(self) -> None:
        """Wait (bounded) for remote cancellations still in flight, then forget lookups."""
        if self._cancels:
            await asyncio.wait(set(self._cancels), timeout=self._modal.cancel_timeout_seconds)
        self._services.clear()

    async def ready(self) -> bool:
        return await self._readiness.check()

    async def clone(self, job: CloneJob, timeout: float) -> CloneResult:  # noqa: ASYNC109
        service = self._service(job.model)
        deadline = asyncio.get_running_loop().time() + timeout
        call = await self._spawn(service, job, deadline)
        return result_from_output(await self._result(call, deadline))

    def _service(self, model: str) -> Any:
        service = self._services.get(model)
        if service is None:
            app = self._apps.get(model)
            if app is None:
                raise InvalidInput(f"model {model!r} is not served by this worker")
            cls = modal.Cls.from_name(
                app, self._modal.class_name, environment_name=self._modal.environment_name
            )
            service = self._services[model] = cls()  # lazy: no network until the first spawn
        return service

    async def _spawn(self, service: Any, job: CloneJob, deadline: float) -> Any:
        # Shielded: if we stop waiting, the spawn still finishes, so its call can be cancelled.
        spawn = asyncio.ensure_future(service.clone.spawn.aio(**remote_arguments(job)))
        try:
            async with asyncio.timeout_at(deadline):
                return await asyncio.shield(spawn)
        except TimeoutError as exc:
            await self._clean_up(self._cancel_once_spawned(spawn, "deadline"))
            raise BackendTimeout("Modal did not accept the call before the deadline") from exc
        except asyncio.CancelledError:
            await self._clean_up(self._cancel_once_spawned(spawn, "cancelled"))
            raise
        except _CALL_FAILURES as exc:
            error = translate_modal_error(exc)
            if isinstance(error, BackendUnavailable):
                # The lookup may have failed; look up afresh next time (e.g. after a deploy).
                self._services.pop(job.model, None)
            raise error from exc

    async def _result(self, call: Any, deadline: float) -> object:
        remaining = max(deadline - asyncio.get_running_loop().time(), 0.0)
        try:
            # `get`'s own timeout ends Modal's long poll; timeout_at is the hard bound.
            async with asyncio.timeout_at(deadline):
                return await call.get.aio(timeout=remaining)
        except TimeoutError as exc:
            await self._cancel_remote(call, "deadline")
            raise BackendTimeout("no result from Modal before the deadline") from exc
        except asyncio.CancelledError:
            await self._cancel_remote(call, "cancelled")
            raise
        except _CALL_FAILURES as exc:
            error = translate_modal_error(exc)
            if isinstance(error, BackendUnavailable):
                await self._cancel_remote(call, "lost")  # we stop waiting; so should the GPU
            raise error from exc

    async def _cancel_remote(self, call: Any, reason: str) -> None:
        await self._clean_up(self._cancel_call(call, reason))

    async def _clean_up(self, cleanup: Coroutine[Any, Any, None]) -> None:
        """Run `cleanup` to its (bounded) end even if this task is cancelled again meanwhile."""
        task = asyncio.create_task(cleanup)
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)
        await asyncio.shield(task)

    async def _cancel_once_spawned(self, spawn: asyncio.Future[Any], reason: str) -> None:
        try:
            async with asyncio.timeout(self._modal.cancel_timeout_seconds):
                call = await spawn
        except TimeoutError:
            # The call, if made, runs on until the function's own timeout.
            log.warning("modal_spawn_abandoned", reason=reason)
            return
        except Exception:
            return  # the spawn failed: there is no call to cancel
        await self._cancel_call(call, reason)

    async def _cancel_call(self, call: Any, reason: str) -> None:
        call_id = getattr(call, "object_id", None)
        try:
            async with asyncio.timeout(self._modal.cancel_timeout_seconds):
                await call.cancel.aio()
        except Exception as exc:  # the call still ends at the function's own timeout
            log.warning("modal_call_cancel_failed", call_id=call_id, reason=reason, error=repr(exc))
        else:
            log.info("modal_call_cancelled", call_id=call_id, reason=reason)


class _Readiness:
    """Whether every served app can be looked up, re-checked at most once per TTL."""

    def __init__(self, settings: BackendSettings) -> None:
        self._modal = settings.modal
        self._apps = sorted(set(settings.modal.apps().values()))
        self._lock = asyncio.Lock()
        self._answer = False
        self._checked_at: float | None = None
        self._ttl = settings.modal.ready_cache_seconds

    async def check(self) -> bool:
        async with self._lock:  # concurrent probes share one lookup
            now = asyncio.get_running_loop().time()
            fresh = self._checked_at is not None and now - self._checked_at < self._ttl
            if not fresh:
                self._answer = all(await asyncio.gather(*map(self._look_up, self._apps)))
                self._checked_at = asyncio.get_running_loop().time()
            return self._answer

    async def _look_up(self, app: str) -> bool:
        try:
            await look_up(self._modal, app)
        except VoicecloneError as exc:
            log.warning("modal_lookup_failed", app=app, error=repr(exc))
            return False
        return True


async def look_up(settings: ModalBackendSettings, app: str) -> None:
    """Look up the service class of `app` within the ready timeout; `VoicecloneError` if not."""
    # A fresh reference each time: a hydrated one would answer from memory.
    cls = modal.Cls.from_name(app, settings.class_name, environment_name=settings.environment_name)
    try:
        async with asyncio.timeout(settings.ready_timeout_seconds):
            await cls.hydrate.aio()
    except Exception as exc:
        raise translate_modal_error(exc) from exc


def _start_hint(error: VoicecloneError) -> str:
    """What to do about a failed lookup at start, in one sentence."""
    cause = error.__cause__
    if isinstance(cause, modal.exception.AuthError | modal.exception.PermissionDeniedError):
        return (
            "Set MODAL_TOKEN_ID and MODAL_TOKEN_SECRET (or ~/.modal.toml, `modal token new`), "
            "or choose another backend with VOICECLONE_BACKEND__KIND=http or local."
        )
    if isinstance(cause, modal.exception.NotFoundError):
        return (
            "Deploy it (see docs/gpu-service.md), point "
            "VOICECLONE_BACKEND__MODAL__APP_1_7B / __APP_0_6B at the deployed apps, or choose "
            "another backend with VOICECLONE_BACKEND__KIND=http or local."
        )
    return (
        "Check the connection to Modal, or choose another backend with "
        "VOICECLONE_BACKEND__KIND=http or local."
    )


def remote_arguments(job: CloneJob) -> dict[str, Any]:
    """Keyword arguments of the remote `clone` method for `job`."""
    return {
        "text": job.text,
        "language": job.language,
        "reference_audio": job.reference_audio,
        "reference_text": job.reference_text,
        "output_format": job.output_format,
        "generation": job.generation.overrides() or None,
        "request_id": job.request_id,
    }


def result_from_output(output: object) -> CloneResult:
    """A `CloneResult` from what the remote `clone` returned; `GenerationFailed` if that breaks
    the contract."""
    result = service_result(output)
    return CloneResult(
        audio=result.audio,
        cold_start=result.container.cold_start,
        model_load_seconds=result.container.model_load_seconds,
        container_id=result.container.container_id,
        inference_seconds=result.inference_seconds,
        capped=result.capped,
    )


def service_result(output: object) -> ServiceResult:
    """`output` as a `ServiceResult`, also when a service not yet redeployed sent the old dict."""
    if isinstance(output, Mapping):
        try:
            output = ServiceResult.from_dict(output)
        except (KeyError, TypeError) as exc:
            raise GenerationFailed(f"the Modal service broke its result contract: {exc!r}") from exc
    if not isinstance(output, ServiceResult) or not isinstance(output.audio, bytes):
        raise GenerationFailed("the Modal service returned no audio bytes (contract mismatch)")
    return output
