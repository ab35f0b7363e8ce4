"""Backend settings as the worker reads them from the environment, and the factory."""

import pytest
from pydantic import BaseModel, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from consumer.backends import BACKENDS, BackendSettings, make_backend
from consumer.backends.http import HttpBackend
from consumer.backends.modal import ModalBackend


class WorkerSettings(BaseSettings):
    """The worker nests the backend settings like this."""

    model_config = SettingsConfigDict(env_prefix="VOICECLONE_", env_nested_delimiter="__")

    backend: BackendSettings = BackendSettings()


def test_defaults_serve_both_sizes_on_modal() -> None:
    settings = BackendSettings()

    assert settings.kind == "modal"
    assert settings.modal.apps() == {
        "1.7B": "voiceclone-qwen3-tts-1-7b",
        "0.6B": "voiceclone-qwen3-tts-0-6b",
    }
    assert settings.local.models() == {
        "1.7B": "Qwen/Qwen3-TTS-12Hz-1.7B-Base",
        "0.6B": "Qwen/Qwen3-TTS-12Hz-0.6B-Base",
    }


def test_environment_configures_nested_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOICECLONE_BACKEND__KIND", "HTTP")
    monkeypatch.setenv("VOICECLONE_BACKEND__TIMEOUT_SECONDS", "120")
    monkeypatch.setenv("VOICECLONE_BACKEND__MODAL__APP_0_6B", "")
    monkeypatch.setenv("VOICECLONE_BACKEND__HTTP__BASE_URL", "http://tts:8000/")
    monkeypatch.setenv("VOICECLONE_BACKEND__HTTP__BASE_URL_0_6B", "http://tts-small:8000")

    backend = WorkerSettings().backend

    assert (backend.kind, backend.timeout_seconds) == ("http", 120)
    assert backend.modal.apps() == {"1.7B": "voiceclone-qwen3-tts-1-7b"}
    assert backend.http.base_urls() == {"1.7B": "http://tts:8000", "0.6B": "http://tts-small:8000"}


@pytest.mark.parametrize(
    "settings",
    [{"kind": "grpc"}, {"timeout_seconds": 0}, {"http": {"base_url": "tts:8000"}}],
    ids=["kind", "timeout", "url-scheme"],
)
def test_bad_settings_fail_validation(settings: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        BackendSettings.model_validate(settings)


def _undescribed(model: type[BaseModel], prefix: str = "") -> list[str]:
    missing = []
    for name, info in model.model_fields.items():
        if not info.description:
            missing.append(prefix + name)
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            missing += _undescribed(info.annotation, f"{prefix}{name}.")
    return missing


def test_every_field_is_described_for_the_readme() -> None:
    assert _undescribed(BackendSettings) == []


def test_factory_builds_the_configured_kind() -> None:
    assert isinstance(make_backend(BackendSettings(kind="modal")), ModalBackend)
    assert isinstance(make_backend(BackendSettings(kind="http")), HttpBackend)
    assert make_backend(BackendSettings(kind="local")).name == "local"


def test_factory_rejects_a_kind_without_a_constructor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(BACKENDS, "local")
    with pytest.raises(ValueError, match="'local' is not available; choose one of: http, modal"):
        make_backend(BackendSettings(kind="local"))
