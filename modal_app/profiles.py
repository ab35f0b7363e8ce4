"""The two model sizes and the Modal names the worker looks them up by.

Plain data with no Modal or torch import, so the worker can find a deployed service with
`modal.Cls.from_name(profile.app_name, SERVICE_CLASS_NAME)`.
"""

from dataclasses import dataclass

SERVICE_CLASS_NAME = "Qwen3TTSService"


@dataclass(frozen=True)
class ModelProfile:
    size: str
    repo_id: str
    app_name: str
    gpus: tuple[str, ...]  # first choice first; Modal falls back along the list


PROFILES: dict[str, ModelProfile] = {
    profile.size: profile
    for profile in (
        ModelProfile(
            size="1.7B",
            repo_id="Qwen/Qwen3-TTS-12Hz-1.7B-Base",
            app_name="voiceclone-qwen3-tts-1-7b",
            gpus=("A10G", "L4"),
        ),
        ModelProfile(
            size="0.6B",
            repo_id="Qwen/Qwen3-TTS-12Hz-0.6B-Base",
            app_name="voiceclone-qwen3-tts-0-6b",
            gpus=("T4", "L4"),
        ),
    )
}
DEFAULT_SIZE = "1.7B"


def profile_for(size: str) -> ModelProfile:
    """The profile for a size such as `1.7B` or `0.6b`."""
    by_lower = {name.lower(): profile for name, profile in PROFILES.items()}
    try:
        return by_lower[size.strip().lower()]
    except KeyError:
        raise ValueError(
            f"Unknown model size {size!r}; expected one of {', '.join(PROFILES)}"
        ) from None
