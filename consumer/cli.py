"""The `voiceclone` command line."""

import asyncio
from typing import Annotated

import typer

from producer.admin import create_topics
from producer.settings import ClientSettings

app = typer.Typer(help="Event-driven voice cloning on Kafka and Qwen3-TTS.", no_args_is_help=True)
topics_app = typer.Typer(help="Manage the product's Kafka topics.", no_args_is_help=True)
app.add_typer(topics_app, name="topics")


@topics_app.command("create")
def topics_create(
    partitions: Annotated[
        int | None,
        typer.Option(min=1, help="Partitions per topic (default: the configured number)."),
    ] = None,
) -> None:
    """Create the request, outcome, cancel and dead-letter topics if they are missing."""
    settings = ClientSettings()
    created = asyncio.run(create_topics(settings, partitions))
    for name in settings.topics.all():
        typer.echo(f"{name}: {'created' if name in created else 'exists'}")
