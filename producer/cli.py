"""The `voiceclone` commands of the client: send requests and watch their outcomes, manage
the topics and the event schemas. The worker's command, and the program that joins them, are in
consumer/cli.py; exit codes and the one-line errors in producer/cli_common.py.

Every setting comes from `VOICECLONE_*` environment variables (see docs/configuration.md); options
here are only what differs per invocation.
"""

import asyncio
import json
import os
import re
import select
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final

import structlog
import typer

from producer.admin import create_topics
from producer.cli_common import (
    Exit,
    LogFormatOption,
    LogLevelOption,
    configure_command_logging,
    fail,
    load_settings,
    print_error,
    run_or_exit,
)
from producer.client import Outcome, VoiceCloneClient, download_audio, is_uri
from producer.settings import ClientSettings
from schemas.compatibility import Compatibility
from schemas.events import AudioFormat, AudioReady, CloneFailed, Language, ModelName
from schemas.vocabulary import ModelSize

if TYPE_CHECKING:  # loaded by the commands that use it: the worker never needs it
    from schemas import contracts

# The client's commands, which consumer/cli.py joins to the worker's into the `voiceclone` program.
# Markdown: docstring paragraphs are re-wrapped to the terminal rather than kept line by line.
app = typer.Typer(no_args_is_help=True, rich_markup_mode="markdown")
topics_app = typer.Typer(help="Manage the product's Kafka topics.", no_args_is_help=True)
app.add_typer(topics_app, name="topics")
schemas_app = typer.Typer(
    help="Register the event schemas in a Schema Registry, and check their compatibility.",
    no_args_is_help=True,
)
app.add_typer(schemas_app, name="schemas")

log = structlog.get_logger(__name__)


_OUTCOME_NAMES: Final = {AudioReady: "audio-ready", CloneFailed: "clone-failed"}
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_CLOCK_SKEW: Final = timedelta(minutes=5)
_AGE: Final = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_AGE_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}


DownloadOption = Annotated[
    Path | None,
    typer.Option(file_okay=False, help="Save each audio-ready's audio in this folder."),
]


def parse_since(value: str) -> datetime:
    """An ISO 8601 time (local time when it has no zone) or an age such as 15m."""
    if match := _AGE.fullmatch(value.strip()):
        amount, unit = match.groups()
        return datetime.now(UTC) - timedelta(seconds=float(amount) * _AGE_UNITS[unit])
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is neither ISO 8601 nor an age like 15m") from None
    return parsed if parsed.tzinfo else parsed.astimezone()


def check_reference(reference: str) -> str:
    """A URI as given (the worker reads it), or the path of a local file that exists."""
    if not is_uri(reference) and not Path(reference).is_file():
        problem = "not a file" if Path(reference).exists() else "no such file"
        raise typer.BadParameter(f"{problem}: {reference}")
    return reference


@app.command()
def request(
    reference: Annotated[
        str,
        typer.Option(
            callback=check_reference,
            help="Voice to clone: a local audio file (uploaded to storage first) or a URI the "
            "worker may read (https://, s3://, file://).",
        ),
    ],
    text: Annotated[
        str | None,
        typer.Argument(help="Text to speak. Omitted or '-': read from --text-file or stdin."),
    ] = None,
    transcript: Annotated[
        str | None,
        typer.Option(help="What the reference recording says; omitted: clone from timbre only."),
    ] = None,
    text_file: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="Read the text from a file.")
    ] = None,
    language: Annotated[Language, typer.Option(case_sensitive=False)] = Language.AUTO,
    model: Annotated[
        ModelSize, typer.Option(case_sensitive=False, help="Model size.")
    ] = ModelSize.LARGE,
    output_format: Annotated[
        AudioFormat, typer.Option("--format", case_sensitive=False, help="Audio format.")
    ] = AudioFormat.WAV,
    voice_id: Annotated[
        str | None, typer.Option(help="Stable id of the voice (default: from the reference).")
    ] = None,
    tenant: Annotated[str, typer.Option(help="Tenant the request belongs to.")] = "default",
    deadline_seconds: Annotated[
        float | None,
        typer.Option(min=0, help="Give up (EXPIRED) if not done this many seconds from now."),
    ] = None,
    metadata: Annotated[
        list[str] | None,
        typer.Option(metavar="KEY=VALUE", help="Carried to the outcome event; repeatable."),
    ] = None,
    request_id: Annotated[
        str | None, typer.Option(help="Id of the request (default: a random one).")
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait for the outcome and print it.")
    ] = False,
    timeout: Annotated[
        float | None, typer.Option(min=0, help="With --wait: give up after this many seconds.")
    ] = None,
    download: DownloadOption = None,
    log_format: LogFormatOption = None,
    log_level: LogLevelOption = None,
) -> None:
    """Send a clone request; print its request_id (alone, on stdout).

    With --wait, then print its outcome as one JSON line and exit 0 (audio-ready), 1
    (clone-failed) or 4 (timed out).
    """
    text = read_text(text, text_file)
    settings = load_settings(ClientSettings)
    configure_command_logging(settings, log_format, log_level)
    send = _Send(
        text=text,
        reference=reference,
        options={
            "reference_text": transcript,
            "voice_id": voice_id,
            "tenant_id": tenant,
            "language": language,
            "model": ModelName.of_size(model),
            "output_format": output_format,
            "deadline": _after(deadline_seconds),
            "metadata": dict(parse_pair(pair) for pair in metadata or []),
            "request_id": request_id,
        },
    )
    code = run_or_exit(_request(settings, send, wait, timeout, download), settings)
    raise typer.Exit(code)


@app.command()
def watch(
    request_id: Annotated[
        str | None,
        typer.Option(help="Only this request; exit after its outcome (1 if it failed)."),
    ] = None,
    since: Annotated[
        datetime | None,
        typer.Option(
            parser=parse_since,
            metavar="WHEN",
            help="Start from this time: ISO 8601 (2025-01-31T12:00:00Z) or an age (90s, 15m, "
            "2h, 1d). Default: now; with --request-id, an hour ago.",
        ),
    ] = None,
    from_beginning: Annotated[
        bool,
        typer.Option("--from-beginning", help="Start from the oldest outcome still in the topics."),
    ] = False,
    download: DownloadOption = None,
    timeout: Annotated[
        float | None,
        typer.Option(
            min=0,
            help="Stop after this many seconds: exit 0, or 4 with --request-id and no outcome.",
        ),
    ] = None,
    log_format: LogFormatOption = None,
    log_level: LogLevelOption = None,
) -> None:
    """Follow audio-ready and clone-failed events: one JSON line per outcome on stdout."""
    settings = load_settings(ClientSettings)
    configure_command_logging(settings, log_format, log_level)
    if from_beginning:
        since = _EPOCH
    elif since is None:
        since = None if request_id else datetime.now(UTC)  # None: the client's lookback
    code = run_or_exit(_watch(settings, request_id, since, download, timeout), settings)
    raise typer.Exit(code)


@topics_app.command("create")
def topics_create(
    partitions: Annotated[
        int | None,
        typer.Option(min=1, help="Partitions per topic (default: the configured number)."),
    ] = None,
    log_format: LogFormatOption = None,
    log_level: LogLevelOption = None,
) -> None:
    """Create the request, outcome, cancel and dead-letter topics if they are missing."""
    settings = load_settings(ClientSettings)
    configure_command_logging(settings, log_format, log_level)
    created = run_or_exit(create_topics(settings, partitions), settings)
    for name in settings.topics.all():
        typer.echo(f"{name}: {'created' if name in created else 'exists'}")


@schemas_app.command("register")
def schemas_register(
    compatibility: Annotated[
        Compatibility | None,
        typer.Option(
            case_sensitive=False,
            show_default=False,
            help="Level set on each subject (default: VOICECLONE_SCHEMA_REGISTRY_COMPATIBILITY, "
            "else BACKWARD).",
        ),
    ] = None,
    log_format: LogFormatOption = None,
    log_level: LogLevelOption = None,
) -> None:
    """Register the event schemas under their topics' subjects (`<topic>-value`) in the registry
    at VOICECLONE_SCHEMA_REGISTRY_URL and set each subject's compatibility level. Registering
    again, or after editing only `doc` strings, adds no version."""
    settings = load_settings(ClientSettings)
    configure_command_logging(settings, log_format, log_level)
    url = registry_url(settings)
    level = compatibility or settings.schema_registry_compatibility
    done = run_or_exit(_register_schemas(url, settings, level), settings)
    for registered in done:
        how = "registered" if registered.new else "already registered"
        typer.echo(f"{registered.subject}: id {registered.schema_id} ({how}), {level}")


@schemas_app.command("check")
def schemas_check(
    schemas_dir: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            file_okay=False,
            show_default=False,
            help="Folder of the .avsc files to check, its released versions in history/ "
            "(default: the installed schemas/avro).",
        ),
    ] = None,
    log_format: LogFormatOption = None,
    log_level: LogLevelOption = None,
) -> None:
    """Check the working tree's schemas: against every released version in
    `schemas/avro/history/` (both ways), and, when VOICECLONE_SCHEMA_REGISTRY_URL is set,
    against each subject's latest registered version at the subject's level. Exit 1 when
    incompatible, naming each problem."""
    from schemas import contracts

    settings = load_settings(ClientSettings)
    configure_command_logging(settings, log_format, log_level)
    avro_dir = schemas_dir or contracts.AVRO_DIR
    problems = contracts.check_history(avro_dir, avro_dir / "history")
    checked = "released versions"
    if settings.schema_registry_url:
        url = settings.schema_registry_url
        problems += run_or_exit(_check_registry(url, settings, avro_dir), settings)
        checked += f" and the registry at {url}"
    for problem in problems:
        print_error(problem)
    if problems:
        raise typer.Exit(Exit.INCOMPATIBLE)
    typer.echo(f"compatible with the {checked}")


def registry_url(settings: ClientSettings) -> str:
    if not settings.schema_registry_url:
        fail("no schema registry: set VOICECLONE_SCHEMA_REGISTRY_URL")
    return settings.schema_registry_url


async def _register_schemas(
    url: str, settings: ClientSettings, level: Compatibility
) -> "list[contracts.Registered]":
    from schema_registry.client import AsyncSchemaRegistryClient

    from schemas import contracts

    client = AsyncSchemaRegistryClient(url)
    return await contracts.register(client, contracts.contracts(settings.topics), level)


async def _check_registry(url: str, settings: ClientSettings, avro_dir: Path) -> list[str]:
    from schema_registry.client import AsyncSchemaRegistryClient

    from schemas import contracts

    client = AsyncSchemaRegistryClient(url)
    return await contracts.check_registry(client, contracts.contracts(settings.topics, avro_dir))


@dataclass(frozen=True)
class _Send:
    """One request as the command line gave it: what `VoiceCloneClient.request` takes."""

    text: str
    reference: str
    options: dict[str, Any]


async def _request(
    settings: ClientSettings,
    send: _Send,
    wait: bool,
    timeout: float | None,  # noqa: ASYNC109
    download: Path | None,
) -> Exit:
    # Outcomes are found by their record timestamps, set by the worker's clock: the margin
    # absorbs clock skew between this machine and the worker's.
    sent_at = datetime.now(UTC) - _CLOCK_SKEW
    async with VoiceCloneClient(settings) as client:
        request_id = await client.request(send.text, send.reference, **send.options)
        typer.echo(request_id)
        if not wait:
            return Exit.OK
        return await _report(await client.wait(request_id, sent_at, timeout), download)


async def _watch(
    settings: ClientSettings,
    request_id: str | None,
    since: datetime | None,
    download: Path | None,
    timeout: float | None,  # noqa: ASYNC109
) -> Exit:
    try:
        async with (
            asyncio.timeout(timeout),
            VoiceCloneClient(settings) as client,
            client.follow(request_id, since) as outcomes,
        ):
            log.info("watching", request_id=request_id, since=since and since.isoformat())
            async for outcome in outcomes:
                code = await _report(outcome, download)
                if request_id is not None:
                    return code
    except TimeoutError:
        if request_id is not None:
            raise TimeoutError(f"no outcome for {request_id} within {timeout:g} s") from None
    return Exit.OK  # watched for as long as asked


async def _report(outcome: Outcome, download: Path | None) -> Exit:
    """Print `outcome` as one JSON line (saving its audio first if asked); its exit code."""
    line: dict[str, Any] = {"outcome": _OUTCOME_NAMES[type(outcome)]}
    line |= outcome.model_dump(mode="json")
    if download is not None and isinstance(outcome, AudioReady):
        line["file"] = str(await download_audio(outcome, download))
    typer.echo(json.dumps(line))
    return Exit.OK if isinstance(outcome, AudioReady) else Exit.CLONE_FAILED


def read_text(text: str | None, text_file: Path | None) -> str:
    """The text from the argument, the file, or stdin, whichever was given (exactly one)."""
    inline = None if text == "-" else text
    sources = (("TEXT", inline), ("--text-file", text_file))
    given = [name for name, value in sources if value is not None]
    if given and stdin_has_data():
        given.append("stdin")
    if len(given) > 1:
        raise typer.BadParameter(
            f"give the text once, as TEXT, with --text-file or on stdin, not {' and '.join(given)}"
        )
    if not given and (sys.stdin is None or sys.stdin.isatty()):
        raise typer.BadParameter("give the text as an argument, with --text-file, or on stdin")
    if inline is None:
        # Surrounding whitespace is an artefact of files and pipes (`echo` adds a newline).
        inline = (text_file.read_text("utf-8") if text_file else sys.stdin.read()).strip()
    if not inline.strip():
        raise typer.BadParameter("the text is empty")
    return inline


def stdin_has_data() -> bool:
    """Whether stdin holds something to read right now: not a terminal, and at least one byte
    already there. End of file (`< /dev/null`, a closed or empty pipe: cron, CI) and a pipe whose
    writer has written nothing yet are no input; neither is waited for."""
    if sys.stdin is None or sys.stdin.isatty():
        return False
    fd = sys.stdin.fileno()
    ready, _, _ = select.select([fd], [], [], 0)
    # Read, not peeked (a pipe cannot be): it is only read when the text is given otherwise,
    # and then a byte there is refused anyway.
    return bool(ready) and os.read(fd, 1) != b""


def parse_pair(value: str) -> tuple[str, str]:
    key, sep, val = value.partition("=")
    if not sep or not key:
        raise typer.BadParameter(f"expected KEY=VALUE, got {value!r}")
    return key, val


def _after(seconds: float | None) -> datetime | None:
    return None if seconds is None else datetime.now(UTC) + timedelta(seconds=seconds)
