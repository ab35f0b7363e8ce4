"""The modal backend, through a stand-in for Modal's cloud only.

`modal.Cls.from_name` is replaced by a fake deployment registry whose calls behave like
Modal's (`spawn.aio`, `get.aio(timeout=...)` raising the builtin `TimeoutError` when no output
arrived, `cancel.aio()`), so the backend's deadline, cancellation and error mapping run for
real against Modal's own exception types.
"""

import asyncio
import io
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import modal
import modal.exception as mx
import pytest
import soundfile
from modal._serialization import serialize

from consumer.backends import (
    BackendSettings,
    BackendTimeout,
    BackendUnavailable,
    ErrorCode,
    GenerationFailed,
    GenerationParams,
    InvalidInput,
)
from consumer.backends.base import CloneResult
from consumer.backends.modal import ModalBackend
from modal_app.contract import ContainerFacts, ServiceResult
from schemas.vocabulary import VoicecloneError
from tests.consumer.backends.conftest import CloneJobFactory, make_wav

APP_LARGE = "voiceclone-qwen3-tts-1-7b"
APP_SMALL = "voiceclone-qwen3-tts-0-6b"


class Aio:
    """What synchronicity gives Modal's methods: the async form lives under `.aio`."""

    def __init__(self, function: Callable[..., Awaitable[Any]]) -> None:
        self.aio = function


def synthesize(arguments: dict[str, Any]) -> ServiceResult:
    """The GPU service's contract: audio for the text, plus facts about the call."""
    seconds = len(arguments["text"]) * 0.05
    return ServiceResult(
        audio=make_wav(seconds),
        format="WAV",
        content_type="audio/wav",
        sample_rate=24_000,
        duration_seconds=seconds,
        chunks=1,
        prompt_cache_hit=False,
        inference_seconds=2.25,
        container=ContainerFacts(
            container_id="ta-123",
            cold_start=True,
            model_load_seconds=41.5,
            restored_from_snapshot=False,
        ),
        capped=True,
    )


def old_service_result(arguments: dict[str, Any]) -> dict[str, Any]:
    """What a service deployed before `ServiceResult` returns: a flat dict."""
    return {
        "audio": make_wav(1.5),
        "format": "FLAC",
        "content_type": "audio/flac",
        "sample_rate": 24_000,
        "duration_seconds": 1.5,
        "chunks": 1,
        "prompt_cache_hit": True,
        "cold_start": False,
        "model_load_seconds": 12.5,
        "restored_from_snapshot": True,
        "container_id": "ta-old",
        "inference_seconds": 3.75,
    }


class FakeCall:
    """A spawned call: finishes after `run_seconds` (None: never) unless cancelled."""

    def __init__(self, outcome: Callable[[], Any], run_seconds: float | None) -> None:
        self.object_id = "fc-test"
        self.get = Aio(self._get)
        self.cancel = Aio(self._cancel)
        self.cancelled = False
        self._output: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._timer = (
            None
            if run_seconds is None
            else asyncio.get_running_loop().call_later(run_seconds, self._finish, outcome)
        )

    def _finish(self, outcome: Callable[[], Any]) -> None:
        try:
            self._output.set_result(outcome())
        except BaseException as exc:  # the remote raised: Modal re-raises it at get()
            self._output.set_exception(exc)

    async def _get(self, timeout: float | None = None) -> Any:  # noqa: ASYNC109 (Modal's signature)
        try:
            return await asyncio.wait_for(asyncio.shield(self._output), timeout)
        except TimeoutError:
            raise TimeoutError from None  # Modal's poll raises the bare builtin

    async def _cancel(self, terminate_containers: bool = False) -> None:
        self.cancelled = True
        if self._timer is not None:
            self._timer.cancel()


@dataclass
class FakeDeployment:
    """One deployed app: how its `clone` calls behave, and what they were asked."""

    outcome: Callable[[dict[str, Any]], Any] = synthesize
    run_seconds: float | None = 0.01
    spawn_seconds: float = 0.0
    spawn_error: BaseException | None = None
    lookup_error: BaseException | None = None
    lookup_seconds: float = 0.0
    calls: list[FakeCall] = field(default_factory=list)
    arguments: list[dict[str, Any]] = field(default_factory=list)
    spawned: asyncio.Event = field(default_factory=asyncio.Event)

    async def spawn(self, **arguments: Any) -> FakeCall:
        if self.lookup_error is not None:  # spawn hydrates the class first
            raise self.lookup_error
        await asyncio.sleep(self.spawn_seconds)
        if self.spawn_error is not None:
            raise self.spawn_error
        self.arguments.append(arguments)
        call = FakeCall(lambda: self.outcome(arguments), self.run_seconds)
        self.calls.append(call)
        self.spawned.set()
        return call

    async def hydrate(self) -> None:
        await asyncio.sleep(self.lookup_seconds)
        if self.lookup_error is not None:
            raise self.lookup_error


class FakeModal:
    """Stands in for `modal.Cls.from_name`: deployed apps by name, and the lookups made."""

    def __init__(self) -> None:
        self.apps: dict[str, FakeDeployment] = {}
        self.lookups: list[tuple[str, str, str | None]] = []

    def from_name(self, app: str, name: str, *, environment_name: str | None = None) -> Any:
        self.lookups.append((app, name, environment_name))
        missing = mx.NotFoundError(f"Lookup failed for Cls '{name}' from the '{app}' app")
        deployment = self.apps.get(app) or FakeDeployment(lookup_error=missing)
        service = type("Service", (), {"clone": type("Method", (), {"spawn": None})()})()
        service.clone.spawn = Aio(deployment.spawn)
        cls = type("Cls", (), {"__call__": lambda self: service})()
        cls.hydrate = Aio(deployment.hydrate)
        return cls


@pytest.fixture
def fake_modal(monkeypatch: pytest.MonkeyPatch) -> FakeModal:
    fake = FakeModal()
    fake.apps = {APP_LARGE: FakeDeployment(), APP_SMALL: FakeDeployment()}
    monkeypatch.setattr(modal.Cls, "from_name", fake.from_name)
    return fake


def make_backend(**settings: Any) -> ModalBackend:
    return ModalBackend(BackendSettings(**settings))


def raising(exc: BaseException) -> Callable[[dict[str, Any]], Any]:
    def outcome(_: dict[str, Any]) -> Any:
        raise exc

    return outcome


async def test_clone_returns_the_services_audio_and_facts(
    fake_modal: FakeModal, clone_job: CloneJobFactory
) -> None:
    job = clone_job(text="x" * 40, generation=GenerationParams(temperature=0.7, seed=7))

    result = await make_backend().clone(job, timeout=10)

    info = soundfile.info(io.BytesIO(result.audio))
    assert (info.format, info.samplerate, info.duration) == ("WAV", 24_000, pytest.approx(2.0))
    assert (result.cold_start, result.model_load_seconds) == (True, 41.5)
    assert (result.container_id, result.inference_seconds) == ("ta-123", 2.25)
    assert result.capped is True
    assert fake_modal.apps[APP_LARGE].arguments == [
        {
            "text": job.text,
            "language": "English",
            "reference_audio": job.reference_audio,
            "reference_text": job.reference_text,
            "output_format": "WAV",
            "generation": {"temperature": 0.7, "seed": 7},
            "request_id": "req-1",
        }
    ]


async def test_xvector_only_and_default_generation_are_sent_as_none(
    fake_modal: FakeModal, clone_job: CloneJobFactory
) -> None:
    await make_backend().clone(clone_job(reference_text=None), timeout=10)

    arguments = fake_modal.apps[APP_LARGE].arguments[0]
    assert (arguments["reference_text"], arguments["generation"]) == (None, None)


async def test_each_model_size_uses_its_own_app_looked_up_once(
    fake_modal: FakeModal, clone_job: CloneJobFactory
) -> None:
    backend = make_backend(modal={"environment_name": "prod"})

    for model in ("0.6B", "1.7B", "0.6B"):
        await backend.clone(clone_job(model=model), timeout=10)

    assert len(fake_modal.apps[APP_SMALL].calls) == 2
    assert len(fake_modal.apps[APP_LARGE].calls) == 1
    assert fake_modal.lookups == [
        (APP_SMALL, "Qwen3TTSService", "prod"),
        (APP_LARGE, "Qwen3TTSService", "prod"),
    ]


async def test_unserved_model_size_is_invalid_input(
    fake_modal: FakeModal, clone_job: CloneJobFactory
) -> None:
    backend = make_backend(modal={"app_0_6b": ""})

    with pytest.raises(InvalidInput, match=r"'0\.6B' is not served") as raised:
        await backend.clone(clone_job(model="0.6B"), timeout=10)

    assert raised.value.code == ErrorCode.INVALID_REQUEST
    assert fake_modal.lookups == []


async def test_deadline_cancels_the_remote_call(
    fake_modal: FakeModal, clone_job: CloneJobFactory
) -> None:
    deployment = fake_modal.apps[APP_LARGE]
    deployment.run_seconds = None  # e.g. a crash-looping container: Modal retries forever
    started = time.monotonic()

    with pytest.raises(BackendTimeout) as raised:
        await make_backend().clone(clone_job(), timeout=0.3)

    assert 0.25 <= time.monotonic() - started < 1.0
    assert (raised.value.transient, raised.value.code) == (True, ErrorCode.INFERENCE_TIMEOUT)
    assert deployment.calls[0].cancelled


async def test_cancellation_cancels_the_remote_call_and_propagates(
    fake_modal: FakeModal, clone_job: CloneJobFactory
) -> None:
    deployment = fake_modal.apps[APP_LARGE]
    deployment.run_seconds = None
    task = asyncio.create_task(make_backend().clone(clone_job(), timeout=60))
    await asyncio.wait_for(deployment.spawned.wait(), timeout=5)

    task.cancel()

    with pytest.raises(asyncio.CancelledError):
        await task
    assert deployment.calls[0].cancelled


async def test_cancellation_during_spawn_cancels_the_call_once_made(
    fake_modal: FakeModal, clone_job: CloneJobFactory
) -> None:
    deployment = fake_modal.apps[APP_LARGE]
    deployment.spawn_seconds = 0.2  # e.g. uploading a large reference recording
    deployment.run_seconds = None
    task = asyncio.create_task(make_backend().clone(clone_job(), timeout=60))
    await asyncio.sleep(0.05)

    task.cancel()

    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(deployment.calls) == 1
    assert deployment.calls[0].cancelled


async def test_lost_contact_while_waiting_cancels_the_call(
    fake_modal: FakeModal, clone_job: CloneJobFactory
) -> None:
    deployment = fake_modal.apps[APP_LARGE]
    deployment.outcome = raising(mx.ConnectionError("connection to Modal lost"))

    with pytest.raises(BackendUnavailable) as raised:
        await make_backend().clone(clone_job(), timeout=10)

    assert raised.value.transient
    assert deployment.calls[0].cancelled


class InvalidInputError(ValueError):
    """Like the service's own bad-input exception, which Modal unpickles here."""

    code = "TEXT_TOO_LONG"


InvalidInputError.__name__ = "InvalidInput"

REMOTE_TRACEBACK = """Could not deserialize remote exception due to local error:
No module named 'service'
Here is the remote traceback:
Traceback (most recent call last):
  File "/root/service.py", line 80, in clone
    raise InvalidInput(message)
service.InvalidInput: Unsupported language: Klingon. Supported: Auto, English
"""


@pytest.mark.parametrize(
    ("exc", "error", "transient", "code"),
    [
        (mx.FunctionTimeoutError("timed out"), BackendTimeout, True, "INFERENCE_TIMEOUT"),
        (mx.InternalFailure("preempted"), BackendUnavailable, True, "INFERENCE_FAILED"),
        (mx.ResourceExhaustedError("rate limit"), BackendUnavailable, True, "INFERENCE_FAILED"),
        (mx.ServiceError("unavailable"), BackendUnavailable, True, "INFERENCE_FAILED"),
        (mx.OutputExpiredError(), GenerationFailed, True, "INFERENCE_FAILED"),
        (mx.RemoteError("container exited"), GenerationFailed, False, "INFERENCE_FAILED"),
        (mx.ExecutionError("could not run"), GenerationFailed, False, "INFERENCE_FAILED"),
        (mx.DeserializationError("bad result"), GenerationFailed, False, "INFERENCE_FAILED"),
        (mx.InputCancellation(), GenerationFailed, False, "INFERENCE_FAILED"),
        (RuntimeError("CUDA out of memory"), GenerationFailed, False, "INFERENCE_FAILED"),
        (ValueError("math domain error"), GenerationFailed, False, "INFERENCE_FAILED"),
        (
            ValueError("Unsupported language: Klingon. Supported: Auto"),
            InvalidInput,
            False,
            "UNSUPPORTED_LANGUAGE",
        ),
        (InvalidInputError("50001 characters"), InvalidInput, False, "TEXT_TOO_LONG"),
        (mx.ExecutionError(REMOTE_TRACEBACK), InvalidInput, False, "UNSUPPORTED_LANGUAGE"),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else None,
)
async def test_call_failures_map_to_backend_errors(
    fake_modal: FakeModal,
    clone_job: CloneJobFactory,
    exc: BaseException,
    error: type[VoicecloneError],
    transient: bool,
    code: str,
) -> None:
    fake_modal.apps[APP_LARGE].outcome = raising(exc)

    with pytest.raises(error) as raised:
        await make_backend().clone(clone_job(), timeout=10)

    assert (raised.value.transient, raised.value.code) == (transient, code)
    assert raised.value.__cause__ is exc


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (mx.AuthError("Token missing"), False),
        (mx.PermissionDeniedError("not your workspace"), False),
        (mx.VersionError("client too old"), False),
        (mx.ConnectionError("cannot reach api.modal.com"), True),
        (mx.ResourceExhaustedError("too many calls"), True),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else None,
)
async def test_spawn_failures_are_unavailable(
    fake_modal: FakeModal, clone_job: CloneJobFactory, exc: BaseException, transient: bool
) -> None:
    fake_modal.apps[APP_LARGE].spawn_error = exc

    with pytest.raises(BackendUnavailable) as raised:
        await make_backend().clone(clone_job(), timeout=10)

    assert (raised.value.transient, raised.value.code) == (transient, "INFERENCE_FAILED")


async def test_missing_app_is_permanent_and_looked_up_again_next_time(
    fake_modal: FakeModal, clone_job: CloneJobFactory
) -> None:
    deployed = fake_modal.apps.pop(APP_LARGE)
    backend = make_backend()

    with pytest.raises(BackendUnavailable, match="not found") as raised:
        await backend.clone(clone_job(), timeout=10)
    assert not raised.value.transient

    fake_modal.apps[APP_LARGE] = deployed  # deployed meanwhile
    await backend.clone(clone_job(), timeout=10)
    assert len(deployed.calls) == 1


async def test_a_service_not_yet_redeployed_is_read_from_its_dict(
    fake_modal: FakeModal, clone_job: CloneJobFactory
) -> None:
    fake_modal.apps[APP_LARGE].outcome = old_service_result

    result = await make_backend().clone(clone_job(), timeout=10)

    assert result == CloneResult(
        audio=make_wav(1.5),
        cold_start=False,
        model_load_seconds=12.5,
        container_id="ta-old",
        inference_seconds=3.75,
    )


WORKER_READS_STDIN = """
import sys
from modal._serialization import deserialize
output = deserialize(sys.stdin.buffer.read(), None)
from consumer.backends.modal import result_from_output
result = result_from_output(output)
print(type(output).__module__, type(output).__qualname__, len(result.audio), result.container_id)
"""


def test_the_result_crosses_modals_serialisation_into_another_process() -> None:
    """Pickled by Modal's own serializer (cloudpickle) as the service's container does, read in a
    fresh process that has imported nothing: the class is found by its module, not rebuilt."""
    sent = synthesize({"text": "x" * 20})

    worker = subprocess.run(
        [sys.executable, "-c", WORKER_READS_STDIN],
        input=serialize(sent),
        capture_output=True,
        check=True,
        timeout=120,
    )

    line = worker.stdout.decode().strip()
    assert line == f"modal_app.contract ServiceResult {len(sent.audio)} ta-123"


@pytest.mark.parametrize(
    "output",
    [
        None,
        "audio",
        {"format": "WAV"},
        {key: value for key, value in old_service_result({}).items() if key != "container_id"},
        replace(synthesize({"text": "hi"}), audio=None),
    ],
    ids=["nothing", "text", "no-audio", "no-container-id", "audio-not-bytes"],
)
async def test_result_breaking_the_contract_is_generation_failed(
    fake_modal: FakeModal, clone_job: CloneJobFactory, output: object
) -> None:
    fake_modal.apps[APP_LARGE].outcome = lambda _: output

    with pytest.raises(GenerationFailed, match="contract"):
        await make_backend().clone(clone_job(), timeout=10)


async def test_ready_when_every_served_app_is_found_and_cached(
    fake_modal: FakeModal,
) -> None:
    backend = make_backend(modal={"ready_cache_seconds": 60})

    assert await backend.ready()
    fake_modal.apps.pop(APP_SMALL)
    assert await backend.ready()  # answered from the cache
    assert len(fake_modal.lookups) == 2


async def test_not_ready_when_an_app_is_missing(fake_modal: FakeModal) -> None:
    fake_modal.apps.pop(APP_SMALL)

    assert not await make_backend(modal={"ready_cache_seconds": 0}).ready()
    assert await make_backend(modal={"app_0_6b": None}).ready()  # the size is not served


async def test_real_modal_client_without_credentials_is_permanently_unavailable(
    monkeypatch: pytest.MonkeyPatch, clone_job: CloneJobFactory
) -> None:
    monkeypatch.delenv("MODAL_TOKEN_ID", raising=False)
    monkeypatch.delenv("MODAL_TOKEN_SECRET", raising=False)
    if modal.config.config.get("token_id"):
        pytest.skip("Modal credentials are configured on this machine")
    backend = make_backend()

    async with asyncio.timeout(30):
        with pytest.raises(BackendUnavailable, match="credentials") as raised:
            await backend.clone(clone_job(), timeout=20)
        assert not await backend.ready()

    assert (raised.value.transient, raised.value.code) == (False, "INFERENCE_FAILED")
    assert isinstance(raised.value.__cause__, mx.AuthError)


async def test_start_looks_up_every_served_app(fake_modal: FakeModal) -> None:
    await make_backend(modal={"environment_name": "prod"}).start()

    assert sorted(fake_modal.lookups) == sorted(
        [(APP_LARGE, "Qwen3TTSService", "prod"), (APP_SMALL, "Qwen3TTSService", "prod")]
    )


async def test_start_fails_naming_an_app_that_is_not_deployed(fake_modal: FakeModal) -> None:
    fake_modal.apps.pop(APP_SMALL)

    with pytest.raises(BackendUnavailable) as raised:
        await make_backend().start()

    assert not raised.value.transient
    message = str(raised.value)
    assert f"cannot look up the app {APP_SMALL!r}" in message
    assert "VOICECLONE_BACKEND__MODAL__APP_1_7B / __APP_0_6B" in message
    await make_backend(modal={"app_0_6b": ""}).start()  # the size is not served: not looked up


async def test_start_gives_up_on_a_lookup_after_the_ready_timeout(fake_modal: FakeModal) -> None:
    fake_modal.apps[APP_LARGE].lookup_seconds = 60
    started = time.monotonic()

    with pytest.raises(BackendUnavailable, match="Check the connection to Modal") as raised:
        await make_backend(modal={"ready_timeout_seconds": 0.2}).start()

    assert time.monotonic() - started < 2.0
    assert raised.value.transient


async def test_real_modal_client_without_credentials_fails_at_start_saying_what_to_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("MODAL_TOKEN_ID", raising=False)
    monkeypatch.delenv("MODAL_TOKEN_SECRET", raising=False)
    if modal.config.config.get("token_id"):
        pytest.skip("Modal credentials are configured on this machine")

    async with asyncio.timeout(30):
        with pytest.raises(BackendUnavailable) as raised:
            await make_backend().start()

    assert not raised.value.transient
    message = str(raised.value)
    assert "credentials" in message
    assert "MODAL_TOKEN_ID and MODAL_TOKEN_SECRET" in message
    assert "VOICECLONE_BACKEND__KIND=http or local" in message
    assert isinstance(raised.value.__cause__.__cause__, mx.AuthError)
