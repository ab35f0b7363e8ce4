"""What every `voiceclone` command shares, the client's (producer/cli.py) and the worker's
(consumer/cli.py): settings, logging options, exit codes, and failures told in one line.

Exit codes: 0 done; 1 the request failed (clone-failed), or the schemas are incompatible
(`schemas check`, `schemas register`); 2 usage error; 3 could not run (settings, Kafka, schema
registry, storage, backend); 4 timed out; 130 interrupted.
"""

import asyncio
import logging
import sys
from collections.abc import Coroutine
from enum import IntEnum
from typing import Annotated, Any, NoReturn, TypeVar

import httpx
import typer
from aiokafka.errors import KafkaConnectionError, KafkaError
from pydantic import ValidationError

from producer.client import DownloadError, TopicsMissing
from producer.kafka_security import explain_connection_failure
from producer.logs import configure_logging
from producer.settings import ClientSettings, LogFormat, LogLevel
from producer.storage import StorageError
from producer.transactions import TransactionsFailed

T = TypeVar("T")
SettingsT = TypeVar("SettingsT", bound=ClientSettings)


class Exit(IntEnum):
    OK = 0
    CLONE_FAILED = 1
    INCOMPATIBLE = 1  # the schemas: the same "the answer is no" as a failed request
    UNAVAILABLE = 3
    TIMEOUT = 4
    INTERRUPTED = 130  # as a shell reports SIGINT


# Failures of the outside world or of configuration: one line tells the user what to fix, a
# traceback would only bury it. Anything else is a bug and keeps its traceback. A command adds
# its own (the worker: its backend's).
EXPECTED_ERRORS: tuple[type[Exception], ...] = (
    StorageError,
    KafkaError,
    OSError,
    ValueError,
    ImportError,
    DownloadError,
    TopicsMissing,
    TransactionsFailed,
)

# The defaults, and the variables, are the settings' (VOICECLONE_LOG_FORMAT, _LOG_LEVEL): read
# with the others, a bad value there is a bad setting (exit 3), a bad option bad usage (exit 2).
LogFormatOption = Annotated[
    LogFormat | None,
    typer.Option(
        case_sensitive=False,
        show_default=False,
        help="json lines, or console for people (default: VOICECLONE_LOG_FORMAT, else json).",
    ),
]
LogLevelOption = Annotated[
    LogLevel | None,
    typer.Option(
        case_sensitive=False,
        show_default=False,
        help="Lowest level logged (default: VOICECLONE_LOG_LEVEL, else info).",
    ),
]


def run_program(app: typer.Typer) -> NoReturn:
    """Run `app` as the `voiceclone` program: bad usage (exit 2) reported in one line like
    every other error, rather than in click's usage box."""
    try:
        code = app(prog_name="voiceclone", standalone_mode=False)
    except typer.TyperException as exc:  # typer's click: usage errors, exit 2
        # Named, not imported, as typer does: giving no command printed the help already.
        if type(exc).__name__ != "NoArgsIsHelpError":
            print_error(usage_message(exc))
        code = exc.exit_code
    sys.exit(code if isinstance(code, int) else Exit.OK)


def usage_message(exc: typer.TyperException) -> str:
    """click's message, but `--option: what is wrong` for a value refused."""
    if not isinstance(exc, typer.BadParameter) or not exc.message:  # a missing one has none
        return exc.format_message()
    if exc.param_hint is not None:
        return f"{exc.param_hint}: {exc.message}"
    if exc.param is not None:
        return f"{' / '.join(exc.param.opts)}: {exc.message}"
    return exc.message


def configure_command_logging(
    settings: ClientSettings,
    log_format: LogFormat | None,
    log_level: LogLevel | None,
    *,
    client: bool = True,
) -> None:
    """Logging as the options say, else as the settings say."""
    level = log_level or settings.log_level
    configure_logging(log_format or settings.log_format, level)
    if client and level is not LogLevel.DEBUG:
        # A client command that cannot reach or use Kafka ends with one line saying why and what
        # to set; aiokafka's own lines (one per failed connection attempt) would only bury it.
        # The worker keeps them: its logs go to a collector, not to a person at a prompt.
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
        # The registry client logs each subject it does not find (new ones, to `schemas`).
        logging.getLogger("schema_registry").setLevel(logging.WARNING)


def load_settings(cls: type[SettingsT]) -> SettingsT:
    """The settings from the environment, or exit 3 naming each bad variable."""
    try:
        return cls()
    except ValidationError as exc:
        problems = "; ".join(
            f"VOICECLONE_{'__'.join(str(p) for p in err['loc']).upper()}: {err['msg']}"
            for err in exc.errors()
        )
        fail(f"invalid settings: {problems}")


def run_or_exit(
    main: Coroutine[Any, Any, T],
    settings: ClientSettings,
    *,
    expected: tuple[type[Exception], ...] = EXPECTED_ERRORS,
) -> T:
    """Run `main` to completion; an `expected` failure exits with one line on stderr (see
    `explain`)."""
    try:
        return asyncio.run(main)
    except KeyboardInterrupt:
        raise typer.Exit(Exit.INTERRUPTED) from None
    except Exception as exc:
        explained = explain(exc, settings, expected)
        if explained is None:
            raise
        fail(*explained)


def explain(
    exc: Exception, settings: ClientSettings, expected: tuple[type[Exception], ...]
) -> tuple[str, Exit] | None:
    """The line that tells the user what went wrong and what to do, with its exit code; None
    for a failure that is not `expected` (a bug)."""
    # Loaded only now: the worker and most commands never need the registry client.
    from schema_registry.client.errors import ClientError as RegistryClientError

    registry = f"schema registry at {settings.schema_registry_url}"
    match exc:
        case TimeoutError():  # its own code, though OSError (expected) is its base
            return str(exc) or "timed out", Exit.TIMEOUT
        case KafkaConnectionError():
            return (
                asyncio.run(explain_connection_failure(settings.kafka))
                or f"cannot reach Kafka at {settings.kafka.bootstrap_servers}: is the broker "
                "running (`make broker-start`)? Set VOICECLONE_KAFKA__BOOTSTRAP_SERVERS to point "
                "elsewhere.",
                Exit.UNAVAILABLE,
            )
        case KafkaError():
            return f"Kafka at {settings.kafka.bootstrap_servers}: {describe(exc)}", Exit.UNAVAILABLE
        # Only the registry client lets these out: downloads raise DownloadError, the backends
        # and the reference fetcher their own errors.
        case httpx.HTTPError() if settings.schema_registry_url:
            return f"cannot reach the {registry}: {describe(exc)}", Exit.UNAVAILABLE
        case RegistryClientError() if settings.schema_registry_url:
            code = Exit.INCOMPATIBLE if exc.http_code == 409 else Exit.UNAVAILABLE
            return f"{registry}: {exc.message}: {exc.server_traceback}", code
    if isinstance(exc, expected):
        return describe(exc), Exit.UNAVAILABLE
    return None


def describe(exc: BaseException) -> str:
    """`Type: message`, without repeating a type name the message already starts with."""
    message = str(exc) or repr(exc)
    name = type(exc).__name__
    return message if message.startswith(name) else f"{name}: {message}"


def fail(message: str, code: Exit = Exit.UNAVAILABLE) -> NoReturn:
    print_error(message)
    raise typer.Exit(code)


def print_error(message: str) -> None:
    typer.echo(f"voiceclone: error: {message}", err=True)
    sys.stderr.flush()
