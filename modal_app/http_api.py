"""The seed's HTTP endpoints, kept for compatibility: a thin FastAPI layer over an engine.

Built by `create_http_app(engine)`, with no Modal import, so tests drive it directly. Request
fields are the seed's (`text`, `language`, `ref_audio_url` | `ref_audio_base64`, `ref_text`,
`max_new_tokens`) plus optional sampling options and `output_format`. Bad input answers HTTP 400
`{"detail": ...}`; a generation failure answers 500.
"""

import base64
import binascii
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, Protocol

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from modal_app.contract import (
    BatchCloneInput,
    BatchCloneOutput,
    CloneInput,
    CloneOutput,
    EngineInfo,
)
from modal_app.languages import DEFAULT_LANGUAGE
from schemas.vocabulary import GenerationParams, InvalidInput, VoicecloneError

MAX_REFERENCE_BYTES = 50 * 1024 * 1024
FETCH_TIMEOUT_SECONDS = 30.0
LANGUAGES_NOTE = "Names are case-insensitive. Auto lets the model infer the language from the text."


class SpeechEngine(Protocol):
    """What the HTTP layer needs from an engine (`modal_app.engine.Engine` has it)."""

    def clone(self, request: CloneInput) -> CloneOutput: ...

    def clone_batch(self, request: BatchCloneInput) -> BatchCloneOutput: ...

    def describe(self) -> EngineInfo: ...


ReferenceFetcher = Callable[[str], bytes]


class VoiceBody(BaseModel):
    ref_audio_url: str | None = None
    ref_audio_base64: str | None = None
    ref_text: str | None = None  # omitted: clone from the voice alone (x-vector-only mode)
    max_new_tokens: int = 2048
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    output_format: str = "WAV"  # or FLAC, OGG_OPUS, MP3 (any case)


class CloneBody(VoiceBody):
    text: str
    language: str = DEFAULT_LANGUAGE


class CloneBatchBody(VoiceBody):
    texts: list[str]
    languages: list[str] | None = None  # one per text; omitted: Auto for all


def fetch_url(url: str) -> bytes:
    """Download reference audio; any failure is the caller's bad input."""
    try:
        response = httpx.get(url, timeout=FETCH_TIMEOUT_SECONDS, follow_redirects=True)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        raise InvalidInput(f"Could not fetch reference audio from {url}: {exc}") from exc
    if len(response.content) > MAX_REFERENCE_BYTES:
        raise InvalidInput(f"Reference audio at {url} is larger than {MAX_REFERENCE_BYTES} bytes")
    return response.content


def create_http_app(engine: SpeechEngine, fetch_reference: ReferenceFetcher = fetch_url) -> FastAPI:
    api = FastAPI(title="Qwen3-TTS voice cloning")
    # Starlette types every handler as taking any Exception, not the class it is added for.
    api.add_exception_handler(RequestValidationError, _validation_error)  # pyright: ignore[reportArgumentType]
    api.add_exception_handler(InvalidInput, _error_response(400))
    api.add_exception_handler(VoicecloneError, _error_response(500))

    @api.post("/clone")
    def clone(body: CloneBody) -> Response:
        request = CloneInput(
            text=body.text, language=body.language, **_voice(body, fetch_reference)
        )
        output = engine.clone(request)
        filename = f"output.{output.audio_format.extension}"
        return Response(
            content=output.audio,
            media_type=output.content_type,
            headers={
                "Content-Disposition": f"attachment; filename={filename}",
                "X-Duration-Seconds": f"{output.duration_seconds:.3f}",
                "X-Inference-Seconds": f"{output.inference_seconds:.3f}",
            },
        )

    @api.post("/clone-batch")
    def clone_batch(body: CloneBatchBody) -> dict[str, Any]:
        languages = body.languages if body.languages is not None else DEFAULT_LANGUAGE
        request = BatchCloneInput(
            texts=body.texts, languages=languages, **_voice(body, fetch_reference)
        )
        result = engine.clone_batch(request)
        files = [
            _audio_file(index, text, item)
            for index, (text, item) in enumerate(zip(body.texts, result.items, strict=True))
        ]
        return {
            "status": "success",
            "count": len(files),
            "audio_files": files,
            "inference_seconds": result.inference_seconds,
        }

    @api.get("/health")
    def health() -> dict[str, Any]:
        info = engine.describe()
        return {
            "status": "healthy",
            **asdict(info),
            "supported_languages": info.languages,
        }

    @api.get("/languages")
    def languages() -> dict[str, Any]:
        return {
            "languages": engine.describe().languages,
            "default": DEFAULT_LANGUAGE,
            "note": LANGUAGES_NOTE,
        }

    return api


def _voice(body: VoiceBody, fetch_reference: ReferenceFetcher) -> dict[str, Any]:
    """The request fields shared by /clone and /clone-batch, as engine keyword arguments."""
    params = GenerationParams(
        temperature=body.temperature,
        top_k=body.top_k,
        top_p=body.top_p,
        repetition_penalty=body.repetition_penalty,
        max_new_tokens=body.max_new_tokens,
        seed=body.seed,
    )
    return {
        "reference_audio": _reference_bytes(body, fetch_reference),
        "reference_text": body.ref_text,
        "params": params,
        "output_format": body.output_format,
    }


def _reference_bytes(body: VoiceBody, fetch_reference: ReferenceFetcher) -> bytes:
    if body.ref_audio_base64:
        return _decode_base64(body.ref_audio_base64)
    if body.ref_audio_url:
        return fetch_reference(body.ref_audio_url)
    raise InvalidInput("One of 'ref_audio_url' or 'ref_audio_base64' is required")


def _decode_base64(value: str) -> bytes:
    """Plain base64 or a data URL (`data:audio/wav;base64,...`), as the seed accepted."""
    payload = value.split(",", 1)[1] if value.startswith("data:") else value
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput("'ref_audio_base64' is not valid base64") from exc


def _audio_file(index: int, text: str, item: CloneOutput) -> dict[str, Any]:
    return {
        "index": index,
        "text": text[:50] + "..." if len(text) > 50 else text,
        "audio_base64": base64.b64encode(item.audio).decode("ascii"),
        "size_bytes": len(item.audio),
        "duration_seconds": item.duration_seconds,
    }


def _error_response(status_code: int) -> Callable[[Request, Exception], JSONResponse]:
    def handle(_request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(status_code=status_code, content={"detail": str(exc)})

    return handle


def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 with a list of errors becomes the seed's 400 with one sentence."""
    return JSONResponse(status_code=400, content={"detail": _first_problem(exc)})


def _first_problem(exc: RequestValidationError) -> str:
    error = exc.errors()[0]
    field = ".".join(str(part) for part in error["loc"] if part != "body")
    if error["type"] == "json_invalid":
        return "Request body is not valid JSON"
    if error["type"] == "missing":
        return f"'{field}' is required"
    return f"'{field}': {error['msg']}" if field else f"Request body: {error['msg']}"
