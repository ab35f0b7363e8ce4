"""Logging for the `voiceclone` processes: structlog events, one line each, on stderr.

`json` (the default, for collectors) renders `{"timestamp": ..., "level": ..., "event": ...,
...}`; `console` renders aligned, coloured lines for people. Records of the standard library's
`logging` (aiokafka, botocore, the engine) go through the same renderer, so a process writes one
format only.
"""

import logging
import sys
from enum import StrEnum
from typing import Final, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

# Event keys that could carry what a user asked to be spoken. Callers never pass them; dropping
# them here keeps a slip from ever reaching a log collector.
REDACTED_KEYS: Final = frozenset({"text", "reference_text", "transcript"})
_LEADING_KEYS: Final = ("timestamp", "level", "event")
# Chatty at INFO (group join steps, connections, model config defaults); warnings still show.
_QUIET_LIBRARIES: Final = (
    "aiokafka",
    "botocore",
    "aiobotocore",
    "urllib3",
    "httpx",
    "httpcore",
    "qwen_tts",
    "transformers",
)


class LogFormat(StrEnum):
    JSON = "json"
    CONSOLE = "console"


class LogLevel(StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


def drop_request_text(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Remove keys that may hold request text or transcripts."""
    for key in REDACTED_KEYS & event_dict.keys():
        del event_dict[key]
    return event_dict


def lead_with_essentials(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Put timestamp, level and event first, so lines read alike whatever else they carry."""
    lead = {key: event_dict.pop(key) for key in _LEADING_KEYS if key in event_dict}
    return lead | event_dict


def configure_logging(
    log_format: LogFormat = LogFormat.JSON,
    level: LogLevel = LogLevel.INFO,
    stream: TextIO | None = None,
) -> None:
    """Route structlog and the standard library's logging to one handler on `stream`
    (default: stderr at call time). Safe to call again: it replaces the previous set-up."""
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        drop_request_text,
    ]
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: a later configure_logging (tests, a second command) must take effect.
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *_renderers(log_format, colors=handler.stream.isatty()),
        ],
    )
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    quiet = logging.DEBUG if level is LogLevel.DEBUG else logging.WARNING
    for name in _QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(quiet)


def _renderers(log_format: LogFormat, *, colors: bool) -> list[Processor]:
    if log_format is LogFormat.CONSOLE:
        # Rich tracebacks show each frame's local variables by default: request text, say.
        tracebacks = structlog.dev.RichTracebackFormatter(
            color_system="truecolor" if colors else None, show_locals=False
        )
        return [structlog.dev.ConsoleRenderer(colors=colors, exception_formatter=tracebacks)]
    # JSON escapes the traceback's newlines, so a record with an exception stays one line.
    return [
        structlog.processors.format_exc_info,
        lead_with_essentials,
        structlog.processors.JSONRenderer(),
    ]
