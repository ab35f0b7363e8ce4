"""Kafka topic names. Every name is configurable; these are the defaults."""

from pydantic import BaseModel


class Topics(BaseModel):
    """Names of the topics the product reads and writes."""

    requests: str = "voice.clone.requests"
    audio_ready: str = "voice.clone.audio-ready"
    failed: str = "voice.clone.failed"
    cancel: str = "voice.clone.cancel"
    dlq: str = "voice.clone.requests.dlq"

    def all(self) -> list[str]:
        return [self.requests, self.audio_ready, self.failed, self.cancel, self.dlq]
