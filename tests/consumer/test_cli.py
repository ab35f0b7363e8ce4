"""The `voiceclone` command line, run as its own process against a real broker."""

import asyncio
import json
import os
import signal
import socket
import sys
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer

from producer.follow import assign_since
from producer.settings import ClientSettings
from schemas.events import AudioFormat, CloneRequest, Language, ModelName
from schemas.topics import Topics
from schemas.wire_format import make_codec
from tests.producer.outcomes import client_settings, clone_failed, publish, stored_audio_ready

TEXT = "Please say this sentence in my voice."
AUDIO = b"RIFF" + bytes(range(256)) * 8
RUN_TIMEOUT_S = 120.0
_EPOCH = datetime.fromtimestamp(0, UTC)


@pytest.fixture
def settings(kafka_bootstrap: str, worker_topics: Topics, tmp_path: Path) -> ClientSettings:
    return client_settings(kafka_bootstrap, worker_topics, tmp_path / "storage")


def cli_env(settings: ClientSettings, **overrides: str) -> dict[str, str]:
    """This machine's environment minus any VOICECLONE_* settings, plus `settings` and
    `overrides` (VOICECLONE_ prefix implied)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOICECLONE_")}
    fields = {
        "KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "STORAGE__LOCAL_ROOT": str(settings.storage.local_root),
        "HTTP__PORT": "0",  # the worker's metrics port: any free one
        **{f"TOPICS__{name.upper()}": topic for name, topic in settings.topics},
        **overrides,
    }
    return env | {f"VOICECLONE_{name}": value for name, value in fields.items()}


async def start_cli(
    env: Mapping[str, str], *args: str, stdin: int = asyncio.subprocess.PIPE
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "consumer",
        *args,
        env=dict(env),
        stdin=stdin,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def run_cli(
    env: Mapping[str, str], *args: str, stdin: str | None = ""
) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of one `voiceclone` run. `stdin` is all in a pipe, closed,
    before the command starts (as `echo TEXT | voiceclone ...` once echo is done); None:
    /dev/null."""
    if stdin is None:
        process = await start_cli(env, *args, stdin=asyncio.subprocess.DEVNULL)
    else:
        read_end, write_end = os.pipe()
        with os.fdopen(write_end, "wb") as pipe:
            pipe.write(stdin.encode())
        try:
            process = await start_cli(env, *args, stdin=read_end)
        finally:
            os.close(read_end)
    async with asyncio.timeout(RUN_TIMEOUT_S):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def wait_for_log(process: asyncio.subprocess.Process, event: str) -> list[str]:
    """Read stderr until a JSON log line with this event; the lines read so far."""
    assert process.stderr is not None
    lines: list[str] = []
    async with asyncio.timeout(RUN_TIMEOUT_S):
        while line := (await process.stderr.readline()).decode():
            lines.append(line)
            if line.startswith("{") and json.loads(line)["event"] == event:
                return lines
    raise AssertionError(f"exited without logging {event}:\n{''.join(lines)}")


def error_line(stderr: str) -> str:
    """The CLI's one-line error (log lines may surround it); there must be no traceback."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("voiceclone: error: ")]
    assert len(errors) == 1, stderr
    return errors[0]


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def read_requests(settings: ClientSettings) -> list[CloneRequest]:
    """Every clone request on the requests topic (there is one per test), decoded."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka.bootstrap_servers, group_id=None)
    await consumer.start()
    try:
        await assign_since(consumer, [settings.topics.requests], _EPOCH)
        batch = await consumer.getmany(timeout_ms=5000)
    finally:
        await consumer.stop()
    codec = make_codec()
    found = []
    for records in batch.values():
        for record in records:
            event = await codec.decode(record.topic, record.value, record.headers)
            assert isinstance(event, CloneRequest)
            found.append(event)
    return found


async def test_request_uploads_the_reference_and_prints_only_the_request_id(
    settings: ClientSettings, tmp_path: Path, reference_wav: bytes
) -> None:
    reference = tmp_path / "My Voice.WAV"
    reference.write_bytes(reference_wav)
    before = datetime.now(UTC)

    code, out, err = await run_cli(
        cli_env(settings),
        "request",
        "--reference", str(reference),
        "--transcript", "Hello world.",
        "--language", "english",
        "--model", "0.6B",
        "--format", "flac",
        "--tenant", "tenant-a",
        "--deadline-seconds", "60",
        "--metadata", "trace=abc",
        "--metadata", "team=voice=x",
        stdin=TEXT,
    )  # fmt: skip

    assert code == 0, err
    request_id = out.strip()
    assert out == f"{request_id}\n"
    (sent,) = await read_requests(settings)
    assert sent.request_id == request_id
    assert sent.text == TEXT
    assert (sent.language, sent.model, sent.output_format) == (
        Language.ENGLISH,
        ModelName.QWEN3_TTS_12HZ_0_6B_BASE,
        AudioFormat.FLAC,
    )
    assert sent.tenant_id == "tenant-a"
    assert sent.metadata == {"trace": "abc", "team": "voice=x"}
    assert sent.deadline is not None
    assert before + timedelta(seconds=59) < sent.deadline < before + timedelta(seconds=90)
    assert sent.voice.reference_text == "Hello world."
    sha = sent.voice.reference_audio_sha256
    stored = settings.storage.local_root.resolve() / "references" / f"{sha}.wav"
    assert sent.voice.reference_audio_uri == stored.as_uri()
    assert stored.read_bytes() == reference_wav
    assert TEXT not in err  # never logged


async def test_request_rejects_text_given_twice(settings: ClientSettings, tmp_path: Path) -> None:
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT)

    code, out, err = await run_cli(
        cli_env(settings), "request", "--reference", "s3://b/v.wav", "--text-file",
        str(text_file), "inline text",
    )  # fmt: skip

    assert (code, out, err) == (
        2,
        "",
        "voiceclone: error: give the text once, as TEXT, with --text-file or on stdin, not TEXT "
        "and --text-file\n",
    )


async def test_request_rejects_text_given_as_argument_and_on_stdin(
    settings: ClientSettings,
) -> None:
    code, out, err = await run_cli(
        cli_env(settings), "request", "--reference", "s3://b/v.wav", "inline text", stdin=TEXT
    )

    assert (code, out, err) == (
        2,
        "",
        "voiceclone: error: give the text once, as TEXT, with --text-file or on stdin, not TEXT "
        "and stdin\n",
    )
    assert await read_requests(settings) == []


@pytest.mark.parametrize("stdin", [None, ""], ids=["dev-null", "empty-pipe"])
async def test_request_takes_the_argument_when_stdin_is_empty(
    settings: ClientSettings, stdin: str | None
) -> None:
    # As under cron or CI: stdin is no terminal, but there is nothing on it.
    code, out, err = await run_cli(
        cli_env(settings), "request", "--reference", "s3://b/v.wav", TEXT, stdin=stdin
    )

    assert code == 0, err
    (sent,) = await read_requests(settings)
    assert (sent.request_id, sent.text) == (out.strip(), TEXT)


async def test_request_with_a_missing_reference_file_is_bad_usage(
    settings: ClientSettings, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-voice.wav"

    code, out, err = await run_cli(
        cli_env(settings), "request", "--reference", str(missing), stdin=TEXT
    )

    assert (code, out, err) == (2, "", f"voiceclone: error: --reference: no such file: {missing}\n")


async def test_log_settings_and_choices_are_read_in_any_case(settings: ClientSettings) -> None:
    env = cli_env(
        settings, LOG_LEVEL="WARNING", LOG_FORMAT="Console", KAFKA__SECURITY_PROTOCOL="plaintext"
    )

    code, out, err = await run_cli(
        env, "request", "--reference", "s3://b/v.wav", "--model", "0.6b", "--format", "FLAC",
        "--language", "English", stdin=TEXT,
    )  # fmt: skip

    assert (code, err) == (0, "")  # nothing at warning or above
    (sent,) = await read_requests(settings)
    assert sent.request_id == out.strip()
    assert (sent.model, sent.output_format, sent.language) == (
        ModelName.QWEN3_TTS_12HZ_0_6B_BASE,
        AudioFormat.FLAC,
        Language.ENGLISH,
    )


async def test_a_bad_log_level_setting_exits_3_and_a_bad_option_2(
    settings: ClientSettings,
) -> None:
    code, out, err = await run_cli(cli_env(settings, LOG_LEVEL="loud"), "watch", "--timeout", "0")
    assert (code, out, err) == (
        3,
        "",
        "voiceclone: error: invalid settings: VOICECLONE_LOG_LEVEL: Input should be 'debug', "
        "'info', 'warning' or 'error'\n",
    )

    code, out, err = await run_cli(cli_env(settings), "watch", "--log-level", "loud")
    assert (code, out) == (2, "")
    assert err.startswith("voiceclone: error: --log-level: ")
    assert err.count("\n") == 1, err
    assert "'loud' is not one of 'debug', 'info', 'warning', 'error'" in err


@pytest.mark.parametrize(
    "command",
    [["request", "--reference", "s3://b/v.wav", TEXT], ["watch"], ["topics", "create"]],
    ids=["request", "watch", "topics-create"],
)
async def test_client_commands_without_kafka_print_only_one_line(
    settings: ClientSettings, command: list[str]
) -> None:
    port = closed_port()
    env = cli_env(settings, KAFKA__BOOTSTRAP_SERVERS=f"127.0.0.1:{port}")

    code, out, err = await run_cli(env, *command)

    # No aiokafka lines, no "Unclosed AIOKafkaProducer": the client whose start failed is closed.
    assert (code, out, err) == (
        3,
        "",
        f"voiceclone: error: cannot reach Kafka at 127.0.0.1:{port}: is the broker running "
        "(`make broker-start`)? Set VOICECLONE_KAFKA__BOOTSTRAP_SERVERS to point elsewhere.\n",
    )


@pytest.mark.parametrize("command", [["schemas", "register"], ["schemas", "check"]])
async def test_schemas_commands_without_a_registry_print_only_one_line(
    settings: ClientSettings, command: list[str]
) -> None:
    url = f"http://127.0.0.1:{closed_port()}"

    code, out, err = await run_cli(cli_env(settings, SCHEMA_REGISTRY_URL=url), *command)

    assert (code, out, err) == (
        3,
        "",
        f"voiceclone: error: cannot reach the schema registry at {url}: ConnectError: All "
        "connection attempts failed\n",
    )


async def test_watch_for_a_request_prints_its_outcome_and_saves_its_audio(
    settings: ClientSettings, tmp_path: Path
) -> None:
    mine = uuid.uuid4().hex
    ready = await stored_audio_ready(settings.storage.local_root, mine, AUDIO)
    await publish(settings, clone_failed(uuid.uuid4().hex), ready)
    out_dir = tmp_path / "downloads"

    code, out, err = await run_cli(
        cli_env(settings), "watch", "--request-id", mine, "--download", str(out_dir),
        "--timeout", "60",
    )  # fmt: skip

    assert code == 0, err
    (line,) = out.splitlines()
    printed = json.loads(line)
    assert printed["outcome"] == "audio-ready"
    assert printed["request_id"] == mine
    assert printed["sha256"] == ready.sha256
    assert printed["file"] == str(out_dir / f"{mine}.wav")
    assert (out_dir / f"{mine}.wav").read_bytes() == AUDIO


async def test_watch_from_now_prints_an_outcome_published_while_watching_and_exits_1_on_failure(
    settings: ClientSettings,
) -> None:
    mine = uuid.uuid4().hex
    process = await start_cli(
        cli_env(settings), "watch", "--since", "0s", "--request-id", mine, "--timeout", "60"
    )
    try:
        await wait_for_log(process, "watching")
        await publish(settings, clone_failed(mine))
        async with asyncio.timeout(RUN_TIMEOUT_S):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()

    assert process.returncode == 1, err
    printed = json.loads(out)
    assert printed["outcome"] == "clone-failed"
    assert (printed["request_id"], printed["error_code"]) == (mine, "REFERENCE_AUDIO_UNAVAILABLE")


async def test_watch_for_a_request_without_outcome_times_out_with_exit_4(
    settings: ClientSettings,
) -> None:
    code, out, err = await run_cli(
        cli_env(settings), "watch", "--request-id", "never", "--timeout", "1"
    )

    assert (code, out) == (4, "")
    assert error_line(err) == "voiceclone: error: no outcome for never within 1 s"


async def test_worker_stops_cleanly_on_sigterm_logging_json_lines(
    settings: ClientSettings,
) -> None:
    # The http backend starts without its service (the modal one would need credentials).
    env = cli_env(settings, BACKEND__KIND="http", GROUP_ID=f"cli-{uuid.uuid4().hex[:8]}")
    process = await start_cli(env, "worker")
    try:
        lines = await wait_for_log(process, "worker_started")
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(RUN_TIMEOUT_S):
            _, rest = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()

    assert process.returncode == 0, "".join(lines) + rest.decode()
    lines += rest.decode().splitlines()
    logged = [json.loads(line) for line in lines if line.startswith("{")]
    assert [entry["event"] for entry in logged][-1] == "worker_stopped"
    for entry in logged:
        assert list(entry)[:3] == ["timestamp", "level", "event"]


async def test_worker_exits_3_with_one_line_when_kafka_is_unreachable(
    settings: ClientSettings,
) -> None:
    port = closed_port()
    env = cli_env(settings, KAFKA__BOOTSTRAP_SERVERS=f"127.0.0.1:{port}", BACKEND__KIND="http")

    code, _, err = await run_cli(env, "worker")

    assert code == 3
    assert error_line(err).startswith(f"voiceclone: error: cannot reach Kafka at 127.0.0.1:{port}")
    assert "Unclosed" not in err  # the producer whose start failed was closed


@pytest.mark.engine
@pytest.mark.slow  # the worker imports torch before it looks for the model
async def test_worker_exits_3_with_one_line_when_the_local_model_is_missing(
    settings: ClientSettings, tmp_path: Path
) -> None:
    pytest.importorskip("torch", reason="needs the engine extra")
    missing = tmp_path / "no-such-model"
    env = cli_env(
        settings,
        BACKEND__KIND="local",
        BACKEND__LOCAL__MODEL_1_7B=str(missing),
        BACKEND__LOCAL__MODEL_0_6B="",
    )

    code, _, err = await run_cli(env, "worker")

    assert code == 3
    line = error_line(err)
    assert str(missing) in line
    assert "VOICECLONE_BACKEND__LOCAL__MODEL_1_7B=" in line


async def test_worker_exits_3_naming_a_bad_setting(settings: ClientSettings) -> None:
    code, _, err = await run_cli(cli_env(settings, MAX_IN_FLIGHT="none"), "worker")

    assert code == 3
    assert error_line(err).startswith(
        "voiceclone: error: invalid settings: VOICECLONE_MAX_IN_FLIGHT"
    )
