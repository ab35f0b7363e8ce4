"""Logging for the `voiceclone` processes: structlog events, one line each, on stderr.

`json` (the default, for collectors) renders `{"timestamp": ..., "level": ..., "event": ...,
...}`; `console` renders aligned, coloured lines for people. Records of the standard library's
`logging` (aiokafka, botocore, the engine) and Python's warnings go through the same renderer,
so a process writes one format only; `output_logged` turns what libraries print (or their child
processes write) into log lines too. A library repeating itself (aiokafka, each time it fails to
reach a broker) is cut to a few lines per message and interval, and a count of those left out.
"""

import contextlib
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Final, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from producer.settings import LogFormat, LogLevel

# Event keys that could carry what a user asked to be spoken. Callers never pass them; dropping
# them here keeps a slip from ever reaching a log collector.
REDACTED_KEYS: Final = frozenset({"text", "reference_text", "transcript"})
_LEADING_KEYS: Final = ("timestamp", "level", "event")
_STANDARD_FDS: Final = (1, 2)  # stdout, stderr
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


# Of each library message (same logger, level and format string, whatever its arguments) at most
# this many lines per interval; the rest are counted, and summed up in one line after it.
REPEATS_PER_INTERVAL: Final = 3
REPEAT_INTERVAL_SECONDS: Final = 10.0


def drop_request_text(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Remove keys that may hold request text or transcripts."""
    for key in REDACTED_KEYS & event_dict.keys():
        del event_dict[key]
    return event_dict


def lead_with_essentials(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Put timestamp, level and event first, so lines read alike whatever else they carry."""
    lead = {key: event_dict.pop(key) for key in _LEADING_KEYS if key in event_dict}
    return {**lead, **event_dict}


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
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    renderers = _renderers(log_format, colors=handler.stream.isatty())
    structlog.configure(
        # Rendered here and written by the handler's stream: a stdlib record and a formatter
        # pass per line cost three times the rendering (bench/). Same processors, same lines.
        processors=[structlog.stdlib.filter_by_level, *shared, *renderers],
        logger_factory=_HandlerLoggerFactory(handler),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: a later configure_logging (tests, a second command) must take effect.
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderers],
    )
    handler.setFormatter(formatter)
    handler.addFilter(RepeatFilter(handler))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # warnings.warn → the "py.warnings" logger, not plain stderr
    quiet = logging.DEBUG if level is LogLevel.DEBUG else logging.WARNING
    for name in _QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(quiet)


@dataclass
class _Window:
    """One message's current interval: when it began and how many lines it has seen."""

    began: float
    seen: int = 0


class RepeatFilter(logging.Filter):
    """On the handler of the standard library's records (the libraries' lines; structlog's are
    written past it): lets the first `limit` lines of each message through per `interval`
    seconds and drops the rest. Once an interval with dropped lines is over, the next library
    line is preceded by one `similar_lines_suppressed` line per such message, with the count.
    """

    def __init__(
        self,
        handler: logging.Handler,
        limit: int = REPEATS_PER_INTERVAL,
        interval: float = REPEAT_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._handler = handler
        self._limit = limit
        self._interval = interval
        self._clock = clock
        self._windows: dict[tuple[str, int, str], _Window] = {}
        self._lock = threading.Lock()  # botocore and the engine log from threads of their own

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "suppressed", None) is not None:  # one of our summaries
            return True
        key = (record.name, record.levelno, str(record.msg))
        with self._lock:
            summaries = self._close_intervals(self._clock())
            window = self._windows.setdefault(key, _Window(self._clock()))
            window.seen += 1
            passes = window.seen <= self._limit
        for summary in summaries:
            self._handler.handle(summary)
        return passes

    def _close_intervals(self, now: float) -> list[logging.LogRecord]:
        """Forget the intervals that are over; a summary record for each that dropped lines."""
        over = [key for key, w in self._windows.items() if now - w.began >= self._interval]
        summaries = []
        for key in over:
            window = self._windows.pop(key)
            if window.seen > self._limit:
                summaries.append(self._summary(key, window.seen - self._limit, now - window.began))
        return summaries

    def _summary(
        self, key: tuple[str, int, str], dropped: int, seconds: float
    ) -> logging.LogRecord:
        name, level, message = key
        return logging.makeLogRecord(
            {
                "name": name,
                "levelno": level,
                "levelname": logging.getLevelName(level),
                "msg": "similar_lines_suppressed",
                "suppressed": dropped,
                "seconds": round(seconds, 1),
                "repeated": message,
            }
        )


@contextlib.contextmanager
def output_logged(event: str) -> Iterator[None]:
    """Log what this process's stdout and stderr receive inside the block (a library's print
    calls, its child processes' output) as one DEBUG line, `event` with the text as `output`,
    rather than letting it out as plain lines among the log lines.

    It redirects the file descriptors, so a child process's writes are caught too; meanwhile the
    log handlers write to copies of the real ones, so log lines, other threads' included, still
    go out as they come. Meant for imports: what other threads write past logging while the
    block runs (nothing, in a worker) would end up in `output` too.
    """
    with tempfile.TemporaryFile() as sink:
        with _handlers_on_copies(), _standard_fds_into(sink):
            yield
        sink.seek(0)
        output = sink.read().decode(errors="replace").strip()
    if output:
        structlog.get_logger(__name__).debug(event, output=output)


@contextlib.contextmanager
def _handlers_on_copies() -> Iterator[None]:
    """Point the root logger's handlers that write to stdout or stderr at copies of them."""
    moved: list[tuple[logging.StreamHandler[TextIO], TextIO, TextIO]] = []
    try:
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler):
                fd = _standard_fd(handler.stream)
                if fd is not None:
                    original = handler.stream
                    copy = os.fdopen(os.dup(fd), "w", encoding=original.encoding)
                    handler.setStream(copy)
                    moved.append((handler, original, copy))
        yield
    finally:
        for handler, original, copy in moved:
            handler.setStream(original)
            copy.close()


def _standard_fd(stream: TextIO) -> int | None:
    """1 or 2 when `stream` is this process's stdout or stderr."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # a stream without a descriptor (StringIO)
        return None
    return fd if fd in _STANDARD_FDS else None


@contextlib.contextmanager
def _standard_fds_into(sink: IO[bytes]) -> Iterator[None]:
    """Redirect file descriptors 1 and 2 into `sink`, flushing Python's buffers on both sides."""
    _flush_standard_streams()
    saved = {fd: os.dup(fd) for fd in _STANDARD_FDS}
    try:
        for fd in _STANDARD_FDS:
            os.dup2(sink.fileno(), fd)
        yield
    finally:
        _flush_standard_streams()  # what a print left buffered belongs to the sink
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)


def _flush_standard_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            with contextlib.suppress(OSError, ValueError):
                stream.flush()


class _HandlerLogger:
    """What structlog writes its rendered lines to: `handler`'s stream, under the handler's
    lock (the stdlib records of other threads go there too). Named and filtered as the stdlib
    logger of the same name, so levels set on the standard library's loggers apply."""

    def __init__(self, logger: logging.Logger, handler: logging.StreamHandler[TextIO]) -> None:
        self._logger = logger
        self._handler = handler
        self.name = logger.name

    # What structlog.stdlib.filter_by_level reads.
    @property
    def disabled(self) -> bool:
        return self._logger.disabled

    def getEffectiveLevel(self) -> int:
        return self._logger.getEffectiveLevel()

    def msg(self, line: str) -> None:
        handler = self._handler
        try:
            with handler.lock or contextlib.nullcontext():
                handler.stream.write(line + handler.terminator)
                handler.flush()
        except Exception:
            # As StreamHandler.emit: a stream that fails (closed, broken pipe) is reported on
            # stderr and never raises into the code that logs.
            handler.handleError(logging.makeLogRecord({"msg": line}))

    debug = info = warning = warn = error = critical = fatal = exception = log = msg


class _HandlerLoggerFactory:
    """structlog's logger factory: a `_HandlerLogger` for the stdlib logger structlog's own
    stdlib factory would pick (the name given, else the calling module's)."""

    def __init__(self, handler: logging.StreamHandler[TextIO]) -> None:
        self._handler = handler
        self._stdlib = structlog.stdlib.LoggerFactory(ignore_frame_names=[__name__])

    def __call__(self, *args: object) -> _HandlerLogger:
        return _HandlerLogger(self._stdlib(*args), self._handler)


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
