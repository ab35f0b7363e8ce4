"""The `voiceclone` program: the worker's command, and the client's (producer/cli.py).

Exit codes, and the one-line errors of every command: producer/cli_common.py.
"""

from typing import Annotated

import typer

from consumer.app import serve
from consumer.backends import BackendError
from consumer.settings import WorkerSettings
from producer import cli as client_cli
from producer.cli_common import (
    EXPECTED_ERRORS,
    LogFormatOption,
    LogLevelOption,
    configure_command_logging,
    load_settings,
    run_or_exit,
    run_program,
)

# Markdown: docstring paragraphs are re-wrapped to the terminal rather than kept line by line.
app = typer.Typer(
    help="Event-driven voice cloning on Kafka and Qwen3-TTS.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)


@app.command()
def worker(
    log_format: LogFormatOption = None,
    log_level: LogLevelOption = None,
    until_idle: Annotated[
        bool,
        typer.Option(
            help="A one-shot batch job: also stop once every request of the worker's "
            "partitions is answered and committed. Run it as its group's only member."
        ),
    ] = False,
) -> None:
    """Run a worker until SIGTERM/SIGINT: consume clone requests, publish their outcomes.

    Exits 0 after draining in-flight requests; 3 with a one-line reason when it cannot start
    (e.g. the backend's model or Kafka is unreachable).
    """
    settings = load_settings(WorkerSettings)
    configure_command_logging(settings, log_format, log_level, client=False)
    run_or_exit(
        serve(settings, until_idle=until_idle),
        settings,
        expected=(*EXPECTED_ERRORS, BackendError),
    )


app.add_typer(client_cli.app)  # no name: its commands join the worker's, after it


def main() -> None:
    run_program(app)
