"""deploy/kafka/broker.py: the broker it runs speaks real Kafka, and its lifecycle is sound.

The client tests use the session broker (`kafka_bootstrap`, whatever its source). The lifecycle
tests drive their own broker in a throwaway cache dir that shares the jars of the default one,
so they never disturb the session broker and pay the Maven fetch at most once.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import NewTopic
from aiokafka.errors import UnknownTopicOrPartitionError
from aiokafka.structs import ConsumerRecord

from tests.fixtures.kafka import BROKER_SCRIPT, OwnCluster, TopicFactory, run_broker_cli

pytestmark = pytest.mark.kafka


def load_broker_module() -> ModuleType:
    """broker.py is a script, not a package module: load it by path for its helpers."""
    spec = importlib.util.spec_from_file_location("kafka_broker_script", BROKER_SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


broker = load_broker_module()
jvm_service = sys.modules["jvm_service"]  # the scaffolding broker.py shares with registry.py


async def consume(bootstrap: str, topic: str, count: int, **config: object) -> list[ConsumerRecord]:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", **config
    )
    await consumer.start()
    records: list[ConsumerRecord] = []
    try:
        async with asyncio.timeout(30):
            while len(records) < count:
                for batch in (await consumer.getmany(timeout_ms=500)).values():
                    records.extend(batch)
    finally:
        await consumer.stop()
    return records


# --- the session broker speaks Kafka ----------------------------------------------------------


async def test_produce_consume_round_trip(kafka_bootstrap: str, topic_factory: TopicFactory):
    topic = await topic_factory("roundtrip", partitions=3)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:
        sent = [
            await producer.send_and_wait(topic, f"v{i}".encode(), key=b"k%d" % (i % 3))
            for i in range(12)
        ]
    finally:
        await producer.stop()

    group = f"roundtrip-{uuid.uuid4().hex[:8]}"  # a real consumer group: offsets topic works
    records = await consume(kafka_bootstrap, topic, 12, group_id=group)

    assert sorted(r.value for r in records) == sorted(f"v{i}".encode() for i in range(12))
    # Same key, same partition: the partitioner and the broker agree.
    partition_of = {r.key: r.partition for r in records}
    assert all(partition_of[b"k%d" % (i % 3)] == meta.partition for i, meta in enumerate(sent))


async def test_idempotent_producer(kafka_bootstrap: str, topic_factory: TopicFactory):
    topic = await topic_factory("idempotent", partitions=1)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, enable_idempotence=True)
    await producer.start()
    try:
        offsets = [(await producer.send_and_wait(topic, b"x%d" % i)).offset for i in range(5)]
    finally:
        await producer.stop()

    assert offsets == list(range(5))
    records = await consume(kafka_bootstrap, topic, 5)
    assert [r.value for r in records] == [b"x%d" % i for i in range(5)]


async def test_transactional_producer(kafka_bootstrap: str, topic_factory: TopicFactory):
    topic = await topic_factory("txn", partitions=1)
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_bootstrap, transactional_id=f"txn-{uuid.uuid4().hex[:8]}"
    )
    await producer.start()
    try:
        async with producer.transaction():
            await producer.send_and_wait(topic, b"committed-1")
        await producer.begin_transaction()
        await producer.send_and_wait(topic, b"aborted")
        await producer.abort_transaction()
        async with producer.transaction():
            await producer.send_and_wait(topic, b"committed-2")
    finally:
        await producer.stop()

    committed = await consume(kafka_bootstrap, topic, 2, isolation_level="read_committed")
    assert [r.value for r in committed] == [b"committed-1", b"committed-2"]
    everything = await consume(kafka_bootstrap, topic, 3, isolation_level="read_uncommitted")
    assert [r.value for r in everything] == [b"committed-1", b"aborted", b"committed-2"]


# --- lifecycle of the manager, in a throwaway cache dir ---------------------------------------


def default_libs() -> Path:
    """The default cache dir's jars (fetched now if missing: the one Maven run of the session)."""
    result = run_broker_cli("fetch")
    assert result.returncode == 0, result.stderr
    home = Path(os.environ.get("VOICECLONE_KAFKA_HOME") or broker.DEFAULT_HOME)
    return home.resolve() / "libs"


def new_home(tmp_path_factory: pytest.TempPathFactory, libs: Path) -> Path:
    home = tmp_path_factory.mktemp("kafka-home")
    (home / "libs").symlink_to(libs, target_is_directory=True)
    return home


def cli(home: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    # Port 0: any free port, so this broker never takes 9092 from the session broker.
    env = {**os.environ, "VOICECLONE_KAFKA_HOME": str(home), "VOICECLONE_KAFKA_PORT": "0"}
    cmd = [sys.executable, str(BROKER_SCRIPT), *args]
    return subprocess.run(
        cmd, input=stdin, capture_output=True, text=True, env=env, timeout=180, check=False
    )


def tool(home: Path, *args: str, stdin: str | None = None) -> str:
    """stdout of `broker.py tool ARGS` on `home`'s broker, which must succeed."""
    result = cli(home, "tool", *args, stdin=stdin)
    assert result.returncode == 0, result.stderr
    return result.stdout


def group_offsets(home: Path, group: str, topic: str) -> dict[int, tuple[int, int]]:
    """partition -> (committed offset, lag), as `kafka-consumer-groups --describe` prints them."""
    described = tool(home, "kafka-consumer-groups", "--describe", "--group", group)
    # GROUP TOPIC PARTITION CURRENT-OFFSET LOG-END-OFFSET LAG CONSUMER-ID HOST CLIENT-ID
    rows = [line.split() for line in described.splitlines() if line.split()[:2] == [group, topic]]
    return {int(row[2]): (int(row[3]), int(row[5])) for row in rows}


def start(home: Path) -> tuple[str, int]:
    """Start (or reuse) the broker in `home`; returns (bootstrap, pid)."""
    result = cli(home, "start")
    assert result.returncode == 0, result.stderr
    last_line = result.stdout.strip().splitlines()[-1]
    assert last_line.startswith("bootstrap=127.0.0.1:")
    return last_line.removeprefix("bootstrap="), broker.read_state(broker.Layout(home)).pid


def is_alive(home: Path, pid: int) -> bool:
    return jvm_service.is_ours(pid, broker.Layout(home))


@pytest.fixture(scope="module")
def libs() -> Path:
    return default_libs()


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, libs: Path) -> Iterator[Path]:
    home = new_home(tmp_path_factory, libs)
    yield home
    cli(home, "stop")


def test_start_is_idempotent_and_status_tracks_it(home: Path):
    bootstrap, pid = start(home)
    port = int(bootstrap.rsplit(":", 1)[1])
    assert is_alive(home, pid)
    assert broker.kafka_ready(port)

    again = cli(home, "start")
    assert again.returncode == 0
    assert "reusing running broker" in again.stderr
    assert again.stdout.strip().splitlines()[-1] == f"bootstrap={bootstrap}"
    assert broker.read_state(broker.Layout(home)).pid == pid

    status = cli(home, "status")
    assert status.returncode == 0
    assert f"pid={pid} bootstrap={bootstrap}" in status.stdout
    assert cli(home, "bootstrap").stdout.strip() == bootstrap
    assert cli(home, "start", "--quiet").stdout.strip() == bootstrap


def test_restart_after_sigkill_keeps_data(home: Path):
    _, pid = start(home)
    cluster_id = broker.read_state(broker.Layout(home)).cluster_id
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while is_alive(home, pid) and time.monotonic() < deadline:
        time.sleep(0.05)

    assert cli(home, "status").returncode == broker.EXIT_STOPPED  # stale pid file noticed
    bootstrap, new_pid = start(home)
    assert new_pid != pid
    assert broker.kafka_ready(int(bootstrap.rsplit(":", 1)[1]))
    assert broker.read_state(broker.Layout(home)).cluster_id == cluster_id  # data dir reused


def test_tools_manage_topics_records_and_consumer_groups(home: Path):
    """Kafka's own tools, run by `broker.py tool` against the running broker (its address filled
    in): create and describe a topic, produce and consume with the console tools, then describe
    the consumer group and reset its offsets."""
    start(home)
    topic, group = f"tools-{uuid.uuid4().hex[:8]}", f"tools-{uuid.uuid4().hex[:8]}"

    tool(home, "kafka-topics", "--create", "--topic", topic, "--partitions", "2")
    assert topic in tool(home, "kafka-topics", "--list").split()
    assert "PartitionCount: 2" in tool(home, "kafka-topics", "--describe", "--topic", topic)

    tool(home, "kafka-console-producer", "--topic", topic, stdin="one\ntwo\nthree\n")
    consumed = tool(
        home,
        *("kafka-console-consumer", "--topic", topic, "--group", group, "--from-beginning"),
        *("--max-messages", "3", "--timeout-ms", "30000"),
    )
    assert sorted(consumed.split()) == ["one", "three", "two"]

    committed = group_offsets(home, group, topic)
    assert sorted(committed) == [0, 1]
    assert sum(offset for offset, _ in committed.values()) == 3
    assert all(lag == 0 for _, lag in committed.values())

    reset = ("--reset-offsets", "--group", group, "--topic", topic, "--to-earliest", "--execute")
    tool(home, "kafka-consumer-groups", *reset)
    rewound = group_offsets(home, group, topic)
    assert all(offset == 0 for offset, _ in rewound.values())
    assert sum(lag for _, lag in rewound.values()) == 3


async def test_a_record_for_a_missing_topic_creates_no_topic(home: Path):
    bootstrap, _ = start(home)
    missing = f"misspelt-{uuid.uuid4().hex[:8]}"
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, request_timeout_ms=3000)
    await producer.start()
    try:
        with pytest.raises(UnknownTopicOrPartitionError):  # no metadata for it ever comes
            await producer.send_and_wait(missing, b"lost")
    finally:
        await producer.stop()

    assert missing not in tool(home, "kafka-topics", "--list").split()


def test_a_tool_needs_a_running_broker_or_an_address(
    tmp_path_factory: pytest.TempPathFactory, libs: Path
):
    home = new_home(tmp_path_factory, libs)

    result = cli(home, "tool", "kafka-topics", "--list")

    assert result.returncode == broker.EXIT_FAIL
    assert "no broker is running" in result.stderr
    assert "pass --bootstrap-server" in result.stderr


def test_fetch_refreshes_jars_fetched_for_an_older_pom(tmp_path: Path):
    """A cache fetched before the pom named kafka-tools (its marker: the bare version) gets
    the tools' jars on the next fetch."""
    libs = broker.Layout(tmp_path).libs
    libs.mkdir()
    broker.Layout(tmp_path).marker.write_text(f"{broker.kafka_version()}\n")

    fetched = cli(tmp_path, "fetch")

    assert fetched.returncode == 0, fetched.stderr
    assert list(libs.glob("kafka-tools-*.jar"))
    assert broker.Layout(tmp_path).marker.read_text().strip() == broker.jar_set(
        broker.kafka_version()
    )


def test_stop_leaves_nothing_running(home: Path):
    _, pid = start(home)

    stopped = cli(home, "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert not is_alive(home, pid)
    assert not broker.Layout(home).pid_file.exists()
    status = cli(home, "status")
    assert (status.returncode, status.stdout.strip()) == (broker.EXIT_STOPPED, "stopped")
    assert cli(home, "bootstrap").returncode == broker.EXIT_STOPPED
    assert cli(home, "stop").returncode == 0  # stopping a stopped broker is fine


def test_pid_file_of_another_process_is_not_ours(
    tmp_path_factory: pytest.TempPathFactory, libs: Path
):
    home = new_home(tmp_path_factory, libs)
    broker.Layout(home).pid_file.write_text(f"{os.getpid()}\n")  # alive, but not a broker

    assert cli(home, "status").returncode == broker.EXIT_STOPPED
    assert cli(home, "stop").returncode == 0  # and it must not signal this pytest process


def test_start_fails_clearly_when_the_port_is_taken(
    tmp_path_factory: pytest.TempPathFactory, libs: Path
):
    home = new_home(tmp_path_factory, libs)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = cli(home, "start", "--port", str(port))

    assert result.returncode == broker.EXIT_FAIL
    assert f"broker port {port} on 127.0.0.1 is already in use" in result.stderr


# --- a three-node cluster ------------------------------------------------------------------------


async def test_a_cluster_replicates_every_topic_and_outlives_a_leader(own_cluster: OwnCluster):
    """Every topic (the internal ones too) on all three nodes, two needed in sync for a write;
    a record written before its partition's leader is SIGKILLed is read after, and the node
    comes back on its ports and catches up."""
    status = run_broker_cli("--home", str(own_cluster.home), "status")
    assert status.returncode == 0, status.stdout
    assert [line.split()[:3] for line in status.stdout.splitlines()] == [
        ["node", f"{n}:", "running"] for n in (1, 2, 3)
    ]
    topic = f"cluster-{uuid.uuid4().hex[:8]}"
    async with own_cluster.admin() as admin:
        await admin.create_topics([NewTopic(topic, 1, replication_factor=3)])
    bootstrap = own_cluster.bootstrap
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=topic)
    await producer.start()
    try:
        async with producer.transaction():
            await producer.send_and_wait(topic, b"before")
        await consume(bootstrap, topic, 1, group_id=topic)  # commits: __consumer_offsets exists
        own_cluster.kill(leader := await own_cluster.leader(topic))
        async with producer.transaction():
            await producer.send_and_wait(topic, b"after")
    finally:
        await producer.stop()
    assert await own_cluster.leader(topic) != leader
    records = await consume(bootstrap, topic, 2, isolation_level="read_committed")
    assert [r.value for r in records] == [b"before", b"after"]

    own_cluster.start()
    await own_cluster.wait_in_sync()
    partitions = await own_cluster.partitions()
    topics = {p["topic"] for p in partitions}
    assert {topic, "__consumer_offsets", "__transaction_state"} <= topics
    assert all(len(p["replicas"]) == 3 for p in partitions), partitions
    assert await own_cluster.min_insync_replicas(topic) == 2
