"""Kafka topic names. Every name is configurable; these are the defaults."""

from pydantic import BaseModel, Field


class Topics(BaseModel):
    """Names of the topics the product reads and writes."""

    requests: str = Field(
        default="voice.clone.requests", description="Clone requests (CloneRequest)."
    )
    audio_ready: str = Field(
        default="voice.clone.audio-ready", description="Successful outcomes (AudioReady)."
    )
    failed: str = Field(default="voice.clone.failed", description="Failed outcomes (CloneFailed).")
    cancel: str = Field(default="voice.clone.cancel", description="Cancellations (CloneCancel).")
    dlq: str = Field(
        default="voice.clone.requests.dlq",
        description="Requests that could not be read, with their original bytes.",
    )

    def all(self) -> list[str]:
        return [self.requests, self.audio_ready, self.failed, self.cancel, self.dlq]
