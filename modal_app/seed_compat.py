"""The seed's compatibility surface on the Modal service: its `clone_batch` and `languages`
methods and its HTTP endpoints, kept for existing callers; the worker uses none of them.

`SeedCompatible` is mixed into `modal_app.app.Qwen3TTSService`, so they share its containers,
engine and input concurrency: Modal collects a class's methods through its bases (none here is
`@modal.batched`, which would have to be the class's only method). `.local()` runs the class's
`@modal.enter` hooks before each of them, as for the service's own methods.
"""

from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Protocol

import modal

from modal_app.contract import BatchCloneInput, CloneOutput, ContainerFacts

if TYPE_CHECKING:
    from modal_app.engine import Engine  # deploying needs no torch


class ServiceCalls(Protocol):
    """What these methods use of the service class they are mixed into."""

    _engine: "Engine"

    def _begin_call(self) -> ContainerFacts: ...

    def _voice(
        self,
        reference_audio: bytes,
        reference_text: str | None,
        output_format: str,
        generation: dict[str, Any] | None,
    ) -> dict[str, Any]: ...

    def _log_call(
        self,
        method: str,
        request_id: str | None,
        facts: ContainerFacts,
        seconds: float,
        chunks: int,
    ) -> None: ...


class SeedCompatible:
    """The seed's Modal methods and HTTP app, for the service class to inherit."""

    @modal.method()
    def clone_batch(
        self: ServiceCalls,
        texts: list[str],
        reference_audio: bytes,
        reference_text: str | None = None,
        languages: list[str] | str = "Auto",
        output_format: str = "WAV",
        generation: dict[str, Any] | None = None,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        """Many texts in one voice, generated together. `languages`: one for all or one each."""
        facts = self._begin_call()
        voice = self._voice(reference_audio, reference_text, output_format, generation)
        result = self._engine.clone_batch(
            BatchCloneInput(texts=texts, languages=languages, **voice)
        )
        chunks = sum(item.chunks for item in result.items)
        self._log_call("clone_batch", request_id, facts, result.inference_seconds, chunks)
        return {
            "items": [_audio_fields(item) for item in result.items],
            "prompt_cache_hit": result.prompt_cache_hit,
            "inference_seconds": result.inference_seconds,
            **asdict(facts),
        }

    @modal.method()
    def languages(self: ServiceCalls) -> list[str]:
        return list(self._engine.languages)

    @modal.asgi_app()
    def web(self: ServiceCalls) -> Any:
        """The seed's HTTP endpoints (/clone, /clone-batch, /health, /languages)."""
        from modal_app.http_api import create_http_app  # FastAPI: only in the image

        return create_http_app(self._engine)


def _audio_fields(output: CloneOutput) -> dict[str, Any]:
    """One item of `clone_batch`'s result."""
    return {
        "audio": output.audio,
        "format": output.audio_format.value,
        "content_type": output.content_type,
        "sample_rate": output.sample_rate,
        "duration_seconds": output.duration_seconds,
        "chunks": output.chunks,
        "prompt_cache_hit": output.prompt_cache_hit,
        "capped": output.capped,
    }
