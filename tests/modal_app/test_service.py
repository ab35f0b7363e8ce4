"""The real Modal class, driven through `.local()` (which runs its @modal.enter hooks), and its
HTTP endpoints, on the tiny model."""

import base64
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

pytest.importorskip("qwen_tts", reason="needs the engine extra")

from modal_app.app import Qwen3TTSService
from modal_app.audio import DecodedAudio
from modal_app.engine import Engine
from modal_app.http_api import create_http_app, fetch_url
from modal_app.languages import SUPPORTED_LANGUAGES
from schemas.vocabulary import InvalidInput
from tests.fixtures.model import REFERENCE_TRANSCRIPT, SAMPLE_RATE, frames_to_samples

pytestmark = [
    pytest.mark.engine,
    # .local() reminds us the Volume is not mounted here; the model comes from a folder.
    pytest.mark.filterwarnings("ignore:The Qwen3TTSService.* executing locally:UserWarning"),
]

FRAMES = 6
SUPPORTED = ", ".join(SUPPORTED_LANGUAGES)


@pytest.fixture(scope="module")
def service(tiny_model_dir: Path) -> Any:
    return Qwen3TTSService(model=str(tiny_model_dir))


@pytest.fixture
async def http(service: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(service.web.local()) as client:
        yield client


def client_for(api: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://service")


def decoded_length(audio: bytes) -> int:
    return len(DecodedAudio.from_bytes(audio).samples)


def test_clone_returns_audio_and_facts_about_the_container(
    tiny_model_dir: Path, reference_wav: bytes
) -> None:
    fresh = Qwen3TTSService(model=str(tiny_model_dir))

    first = fresh.clone.local(
        text="Hello there.",
        reference_audio=reference_wav,
        reference_text=REFERENCE_TRANSCRIPT,
        generation={"max_new_tokens": FRAMES},
        request_id="req-1",
    )
    second = fresh.clone.local(
        text="And again.", reference_audio=reference_wav, generation={"max_new_tokens": FRAMES}
    )

    assert decoded_length(first.audio) == frames_to_samples(FRAMES)
    assert (first.format, first.content_type) == ("WAV", "audio/wav")
    assert first.sample_rate == SAMPLE_RATE
    assert first.duration_seconds == pytest.approx(frames_to_samples(FRAMES) / SAMPLE_RATE)
    assert first.chunks == 1
    assert first.capped is False
    assert first.inference_seconds > 0
    assert first.container.model_load_seconds > 0
    assert first.container.container_id == socket.gethostname()  # MODAL_TASK_ID on Modal
    assert first.container.restored_from_snapshot is False
    assert [first.container.cold_start, second.container.cold_start] == [True, False]
    assert first.container.model_load_seconds == second.container.model_load_seconds


def test_clone_batch_returns_one_item_per_text(service: Any, reference_wav: bytes) -> None:
    result = service.clone_batch.local(
        texts=["First one.", "Second one.", "Third."],
        reference_audio=reference_wav,
        languages=["English", "French", "Auto"],
        output_format="flac",
        generation={"max_new_tokens": FRAMES},
    )

    assert [decoded_length(item["audio"]) for item in result["items"]] == [
        frames_to_samples(FRAMES)
    ] * 3
    assert {item["format"] for item in result["items"]} == {"FLAC"}
    assert result["inference_seconds"] > 0
    assert {"cold_start", "model_load_seconds", "container_id"} <= result.keys()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"language": "Klingon"}, "Unsupported language: Klingon"),
        ({"generation": {"beams": 4}}, "Unknown generation parameters: beams"),
        ({"output_format": "aiff"}, "Unsupported output format: aiff"),
    ],
)
def test_bad_requests_raise_invalid_input(
    service: Any, reference_wav: bytes, overrides: dict[str, Any], message: str
) -> None:
    request = {"text": "Hi.", "reference_audio": reference_wav} | overrides

    with pytest.raises(InvalidInput, match=message):
        service.clone.local(**request)


def test_languages_and_health(service: Any, tiny_model_dir: Path) -> None:
    health = service.health.local()

    assert service.languages.local() == list(SUPPORTED_LANGUAGES)
    assert health["status"] == "healthy"
    assert health["model"] == str(tiny_model_dir)
    assert (health["device"], health["gpu"], health["attention_implementation"]) == (
        "cpu",
        None,
        "sdpa",
    )
    assert health["container_id"] == socket.gethostname()


def clone_body(reference: bytes, **overrides: Any) -> dict[str, Any]:
    body = {
        "text": "Hello there.",
        "language": "English",
        "ref_audio_base64": base64.b64encode(reference).decode(),
        "ref_text": REFERENCE_TRANSCRIPT,
        "max_new_tokens": FRAMES,
    }
    return body | overrides


async def test_http_clone_returns_a_wav_attachment(
    http: httpx.AsyncClient, reference_wav: bytes
) -> None:
    response = await http.post("/clone", json=clone_body(reference_wav))

    assert response.status_code == 200
    assert response.headers["content-type"] == "audio/wav"
    assert response.headers["content-disposition"] == "attachment; filename=output.wav"
    assert decoded_length(response.content) == frames_to_samples(FRAMES)
    assert float(response.headers["x-duration-seconds"]) == pytest.approx(0.4)


async def test_http_clone_accepts_a_data_url_and_another_format(
    http: httpx.AsyncClient, reference_wav: bytes
) -> None:
    data_url = "data:audio/wav;base64," + base64.b64encode(reference_wav).decode()

    response = await http.post(
        "/clone", json=clone_body(reference_wav, ref_audio_base64=data_url, output_format="mp3")
    )

    assert response.status_code == 200
    assert response.headers["content-type"] == "audio/mpeg"
    assert response.headers["content-disposition"] == "attachment; filename=output.mp3"


async def test_http_clone_batch_keeps_the_seeds_response_shape(
    http: httpx.AsyncClient, reference_wav: bytes
) -> None:
    long_text = "This sentence is longer than fifty characters, so it is cut."
    body = clone_body(reference_wav, texts=["Short.", long_text], languages=["English", "Auto"])
    del body["text"], body["language"]

    response = await http.post("/clone-batch", json=body)

    assert response.status_code == 200
    payload = response.json()
    assert (payload["status"], payload["count"]) == ("success", 2)
    files = payload["audio_files"]
    assert [file["index"] for file in files] == [0, 1]
    assert [file["text"] for file in files] == ["Short.", long_text[:50] + "..."]
    audio = [base64.b64decode(file["audio_base64"]) for file in files]
    assert [file["size_bytes"] for file in files] == [len(data) for data in audio]
    assert [decoded_length(data) for data in audio] == [frames_to_samples(FRAMES)] * 2


async def test_http_health_and_languages(http: httpx.AsyncClient) -> None:
    health = (await http.get("/health")).json()
    languages = (await http.get("/languages")).json()

    assert health["status"] == "healthy"
    assert health["supported_languages"] == list(SUPPORTED_LANGUAGES)
    assert {"model", "gpu", "attention_implementation"} <= health.keys()
    assert languages["languages"] == list(SUPPORTED_LANGUAGES)
    assert languages["default"] == "Auto"
    assert languages["note"]


@pytest.mark.parametrize(
    ("path", "change", "detail"),
    [
        ("/clone", {"text": None}, "'text' is required"),
        ("/clone", {"text": "  "}, "'text' is required"),
        (
            "/clone",
            {"ref_audio_base64": None},
            "One of 'ref_audio_url' or 'ref_audio_base64' is required",
        ),
        ("/clone", {"ref_audio_base64": "%%%"}, "'ref_audio_base64' is not valid base64"),
        (
            "/clone",
            {"language": "Klingon"},
            f"Unsupported language: Klingon. Supported: {SUPPORTED}",
        ),
        ("/clone", {"max_new_tokens": 0}, "'max_new_tokens' must be between 1 and 16384, got 0"),
        ("/clone", {"max_new_tokens": "many"}, "'max_new_tokens': Input should be a valid integer"),
        (
            "/clone-batch",
            {"texts": ["a", "b", "c"], "languages": ["English", "German"]},
            "'languages' has 2 entries for 3 texts",
        ),
    ],
)
async def test_http_bad_input_is_a_400_with_one_sentence(
    http: httpx.AsyncClient,
    reference_wav: bytes,
    path: str,
    change: dict[str, Any],
    detail: str,
) -> None:
    body = clone_body(reference_wav) | change
    body = {key: value for key, value in body.items() if value is not None}

    response = await http.post(path, json=body)

    assert response.status_code == 400
    assert response.json()["detail"].startswith(detail)


async def test_http_body_that_is_not_json_is_a_400(http: httpx.AsyncClient) -> None:
    response = await http.post(
        "/clone", content=b"{not json", headers={"content-type": "application/json"}
    )

    assert response.status_code == 400
    assert response.json() == {"detail": "Request body is not valid JSON"}


async def test_http_generation_failure_is_a_500(
    engine: Engine, reference_wav: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(**_kwargs: Any) -> None:
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.tts, "generate_voice_clone", fail)
    async with client_for(create_http_app(engine)) as client:
        response = await client.post("/clone", json=clone_body(reference_wav))

    assert response.status_code == 500
    assert response.json() == {"detail": "Generation failed: device lost"}


async def test_http_reference_url_is_fetched(engine: Engine, reference_wav: bytes) -> None:
    served = {"https://voices.example/me.wav": reference_wav}
    fetched: list[str] = []

    def fetch(url: str) -> bytes:
        fetched.append(url)
        return served[url]

    body = clone_body(reference_wav, ref_audio_url="https://voices.example/me.wav")
    del body["ref_audio_base64"]
    async with client_for(create_http_app(engine, fetch_reference=fetch)) as client:
        response = await client.post("/clone", json=body)

    assert response.status_code == 200
    assert fetched == ["https://voices.example/me.wav"]
    assert np.isclose(float(response.headers["x-duration-seconds"]), 0.4)


def test_an_unreachable_reference_url_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match=r"^Could not fetch reference audio from http://127\.0"):
        fetch_url("http://127.0.0.1:9/voice.wav")
