"""Log configuration: one JSON line per event, structlog and stdlib alike, never request text."""

import io
import json
import logging
import subprocess
import sys
import textwrap
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from producer.logs import (
    REPEAT_INTERVAL_SECONDS,
    REPEATS_PER_INTERVAL,
    LogFormat,
    LogLevel,
    RepeatFilter,
    configure_logging,
)


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """A stream the logs go to for one test; the previous set-up is restored afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    aiokafka_level = logging.getLogger("aiokafka").level
    config = structlog.get_config()
    try:
        yield io.StringIO()
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.getLogger("aiokafka").setLevel(aiokafka_level)
        logging.captureWarnings(False)
        structlog.configure(**config)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_structlog_events_are_json_lines_leading_with_timestamp_level_event(
    stream: io.StringIO,
) -> None:
    configure_logging(LogFormat.JSON, LogLevel.INFO, stream)

    structlog.get_logger("consumer.test").info("stage_done", request_id="r-1", ms=12)

    (entry,) = lines(stream)
    assert list(entry)[:3] == ["timestamp", "level", "event"]
    assert entry | {"timestamp": None} == {
        "timestamp": None,
        "level": "info",
        "event": "stage_done",
        "logger": "consumer.test",
        "request_id": "r-1",
        "ms": 12,
    }


def test_stdlib_records_and_their_exceptions_go_through_the_same_renderer(
    stream: io.StringIO,
) -> None:
    configure_logging(LogFormat.JSON, LogLevel.INFO, stream)

    try:
        int("boom")
    except ValueError:
        logging.getLogger("some.library").exception("it failed: %s", "badly")

    (entry,) = lines(stream)
    assert (entry["level"], entry["event"], entry["logger"]) == (
        "error",
        "it failed: badly",
        "some.library",
    )
    assert "ValueError: invalid literal for int() with base 10: 'boom'" in str(entry["exception"])


def test_python_warnings_go_through_the_same_renderer(stream: io.StringIO) -> None:
    configure_logging(LogFormat.JSON, LogLevel.INFO, stream)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("this argument is deprecated", DeprecationWarning, stacklevel=1)

    (entry,) = lines(stream)
    assert (entry["level"], entry["logger"]) == ("warning", "py.warnings")
    assert "DeprecationWarning: this argument is deprecated" in str(entry["event"])


def test_output_logged_turns_prints_and_child_output_into_one_debug_line() -> None:
    """In a process of its own: what is printed, or written by a child process, inside the
    block comes out as one JSON line after it; log lines meanwhile go straight out."""
    script = textwrap.dedent(
        """
        import subprocess, structlog
        from producer.logs import LogFormat, LogLevel, configure_logging, output_logged

        configure_logging(LogFormat.JSON, LogLevel.DEBUG)
        with output_logged("chatter"):
            print("a banner")
            structlog.get_logger("t").info("meanwhile")
            subprocess.run("echo 'sh: 1: sox: not found' >&2", shell=True, check=True)
        print("after the block")
        """
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr

    assert done.stdout == "after the block\n"  # the standard streams are back
    entries = [json.loads(line) for line in done.stderr.splitlines()]
    assert [(entry["level"], entry["event"]) for entry in entries] == [
        ("info", "meanwhile"),
        ("debug", "chatter"),
    ]
    assert entries[1]["output"] == "a banner\nsh: 1: sox: not found"


def test_request_text_and_transcripts_are_never_written(stream: io.StringIO) -> None:
    configure_logging(LogFormat.JSON, LogLevel.INFO, stream)

    structlog.get_logger().warning(
        "oops", text="secret words", reference_text="my voice", transcript="x", request_id="r"
    )

    (entry,) = lines(stream)
    assert "secret words" not in stream.getvalue()
    assert {"text", "reference_text", "transcript"}.isdisjoint(entry)
    assert entry["request_id"] == "r"


def test_level_filters_our_events_and_libraries_stay_quiet_below_warning(
    stream: io.StringIO,
) -> None:
    configure_logging(LogFormat.JSON, LogLevel.WARNING, stream)
    structlog.get_logger().info("hidden")
    structlog.get_logger().warning("shown")
    configure_logging(LogFormat.JSON, LogLevel.INFO, stream)
    logging.getLogger("aiokafka.cluster").info("metadata refreshed")
    logging.getLogger("aiokafka.cluster").warning("no leader")

    assert [entry["event"] for entry in lines(stream)] == ["shown", "no leader"]


def test_a_library_repeating_itself_writes_a_few_lines(stream: io.StringIO) -> None:
    configure_logging(LogFormat.JSON, LogLevel.INFO, stream)
    aiokafka = logging.getLogger("aiokafka")

    for attempt in range(50):  # as aiokafka does while no broker answers
        aiokafka.error("Unable connect to node with id %s: %s", 1, f"refused ({attempt})")
    aiokafka.error("Unable to update metadata from %s", [1])

    assert [entry["event"] for entry in lines(stream)] == [
        *(f"Unable connect to node with id 1: refused ({n})" for n in range(3)),
        "Unable to update metadata from [1]",
    ]


def test_lines_left_out_are_counted_once_their_interval_is_over(stream: io.StringIO) -> None:
    configure_logging(LogFormat.JSON, LogLevel.INFO, stream)
    handler = logging.getLogger().handlers[0]
    now = [0.0]
    handler.filters[:] = [RepeatFilter(handler, clock=lambda: now[0])]
    fetcher = logging.getLogger("aiokafka.consumer.fetcher")

    for _ in range(REPEATS_PER_INTERVAL + 7):
        fetcher.error("Failed fetch messages from %s: %s", 1, "NodeNotReadyError")
    now[0] += REPEAT_INTERVAL_SECONDS
    fetcher.error("Failed fetch messages from %s: %s", 1, "NodeNotReadyError")

    *passed, summary, again = lines(stream)
    assert len(passed) == REPEATS_PER_INTERVAL
    assert summary | {"timestamp": None} == {
        "timestamp": None,
        "level": "error",
        "event": "similar_lines_suppressed",
        "logger": "aiokafka.consumer.fetcher",
        "suppressed": 7,
        "seconds": REPEAT_INTERVAL_SECONDS,
        "repeated": "Failed fetch messages from %s: %s",
    }
    assert again["event"] == "Failed fetch messages from 1: NodeNotReadyError"


def test_a_failing_stream_never_raises_into_the_code_that_logs(
    stream: io.StringIO, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging(LogFormat.JSON, LogLevel.INFO, stream)
    stream.close()

    structlog.get_logger().info("outcome_published", request_id="r")
    logging.getLogger("some.library").warning("still fine")

    assert "Logging error" in capsys.readouterr().err


def test_console_format_is_for_people(stream: io.StringIO) -> None:
    configure_logging(LogFormat.CONSOLE, LogLevel.INFO, stream)

    structlog.get_logger().info("worker_started", backend="local")

    output = stream.getvalue()
    assert "worker_started" in output
    assert "backend=local" in output
    assert not output.startswith("{")
    assert "\x1b[" not in output  # no colours when the stream is not a terminal


def fail_with(text: str) -> None:
    """Raises with `text` in a local variable, as pipeline code holding a request would."""
    words = text.split()
    raise ValueError(f"cannot say {len(words)} words")


@pytest.mark.parametrize("log_format", list(LogFormat))
def test_tracebacks_show_no_local_variables(stream: io.StringIO, log_format: LogFormat) -> None:
    configure_logging(log_format, LogLevel.INFO, stream)
    secret = f"passphrase {uuid.uuid4().hex}"  # never in this file's source lines

    try:
        fail_with(secret)
    except ValueError:
        structlog.get_logger().exception("handler_failed")

    output = stream.getvalue()
    assert "ValueError" in output
    assert "cannot say 2 words" in output
    assert "fail_with" in output  # the frames are there...
    assert secret.split()[1] not in output  # ...but not the values they held
    assert "\x1b[" not in output  # no colours when the stream is not a terminal
