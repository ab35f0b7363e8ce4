"""How each model size (`schemas.vocabulary.ModelSize`) is deployed, and the Modal names the
worker looks them up by.

Plain data with no Modal or torch import, so the worker can find a deployed service with
`modal.Cls.from_name(profile.app_name, SERVICE_CLASS_NAME)`.
"""

from dataclasses import dataclass

from schemas.vocabulary import DEFAULT_MODEL, ModelName, ModelSize

SERVICE_CLASS_NAME = "Qwen3TTSService"


@dataclass(frozen=True)
class ModelProfile:
    model: ModelName
    app_name: str
    gpus: tuple[str, ...]  # first choice first; Modal falls back along the list
    # Inputs one container serves at once (`@modal.concurrent`, fast generation only): Modal
    # starts another container past `target_inputs` and sends none past `max_inputs`. The
    # fast loop's rows (each input brings one per sentence chunk) are sized with them: a row
    # holds 2048 positions of KV cache, about 235 MB for either size's talker.
    max_inputs: int
    target_inputs: int
    batch_rows: int

    @property
    def size(self) -> ModelSize:
        return self.model.size

    @property
    def repo_id(self) -> str:
        return self.model.hub_id


PROFILES: dict[ModelSize, ModelProfile] = {
    profile.size: profile
    for profile in (
        ModelProfile(
            model=ModelName.QWEN3_TTS_12HZ_1_7B_BASE,
            app_name="voiceclone-qwen3-tts-1-7b",
            gpus=("A10G", "L4"),
            max_inputs=32,
            target_inputs=16,
            batch_rows=32,  # 7.5 GB of KV cache beside 3.4 GB of weights on a 24 GB GPU
        ),
        ModelProfile(
            model=ModelName.QWEN3_TTS_12HZ_0_6B_BASE,
            app_name="voiceclone-qwen3-tts-0-6b",
            gpus=("T4", "L4"),
            max_inputs=16,
            target_inputs=8,  # a T4 is about a third of an A10G
            batch_rows=24,  # 5.6 GB of KV cache beside 1.2 GB of weights on a 16 GB GPU
        ),
    )
}
DEFAULT_SIZE = DEFAULT_MODEL.size


def profile_for(size: str) -> ModelProfile:
    """The profile for a size such as `1.7B` or `0.6b`."""
    by_lower = {name.lower(): profile for name, profile in PROFILES.items()}
    try:
        return by_lower[size.strip().lower()]
    except KeyError:
        raise ValueError(
            f"Unknown model size {size!r}; expected one of {', '.join(PROFILES)}"
        ) from None
