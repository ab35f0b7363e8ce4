"""Chaos on a three-node Kafka cluster (replication factor 3, min.insync.replicas=2): a stream
of requests through two `voiceclone worker` processes while, in turn, the node leading the
requests topic's first partition is SIGKILLed, the group coordinator's node is SIGKILLed, and
(for `exactly_once`) the node coordinating the transactional id of that partition is SIGKILLed;
each is brought back and caught up before the next. Before each of them a random worker is
SIGKILLed and restarted.

The checks are the single-broker chaos test's (one outcome per request to a read_committed
reader under `exactly_once`, identical repeats at most under `at_least_once`, every object
downloadable with its sha256, group lag 0), and every outcome sits on a topic with three
replicas and min.insync.replicas=2, written by the worker's acks=all producer: with one node down
at a time, no outcome is acknowledged before two replicas hold it. The test prints its counts.

That the publisher never has an outcome written with fewer replicas in sync than required is
checked on its own: on a partition with two replicas, one killed, a publish writes nothing and
waits until the replica is back.
"""

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import NewTopic

from consumer.settings import ProcessingGuarantee, WorkerSettings
from producer.admin import create_topics
from producer.publisher import OutcomePublisher
from producer.settings import KafkaSettings
from producer.transactions import transactional_id
from schemas.events import CloneFailed, CloneRequest, ErrorCode
from schemas.topics import Topics
from schemas.wire_format import make_codec
from tests.fixtures.chaos import Chaos, chaos_run, chaos_settings, kill_a_worker, supervise
from tests.fixtures.kafka import CLUSTER_NODES, TRANSACTION, OwnCluster
from tests.fixtures.seed import SeedServer
from tests.fixtures.worker import Requests

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

REQUESTS = 600
SEND_INTERVAL_S = 0.05  # the stream lasts through the faults
NODE_DOWN_S = 3.0  # under load with a node down, before it is brought back
PARTITIONS = 6

Fault = tuple[str, Callable[[], Awaitable[int]]]  # a name, and which node it kills


def faults(cluster: OwnCluster, settings: WorkerSettings) -> list[Fault]:
    found: list[Fault] = [
        ("leader_kills", lambda: cluster.leader(settings.topics.requests)),
        ("group_coordinator_kills", lambda: cluster.coordinator(settings.group_id)),
    ]
    if settings.processing_guarantee is ProcessingGuarantee.EXACTLY_ONCE:
        first = TopicPartition(settings.topics.requests, 0)
        name = transactional_id(settings.effective_transactional_id_prefix(), first)
        found.append(
            (
                "transaction_coordinator_kills",
                lambda: cluster.coordinator(name, TRANSACTION),
            )
        )
    return found


async def kill_node(cluster: OwnCluster, fault: Fault, chaos: Chaos) -> None:
    """SIGKILL the node the fault names, work on without it, bring it back and let it catch up
    (so the next fault again leaves two replicas in sync)."""
    name, find = fault
    await asyncio.to_thread(cluster.kill, await find())
    chaos.counts.fault(name)
    await supervise(chaos, NODE_DOWN_S)
    await asyncio.to_thread(cluster.start)
    await cluster.wait_in_sync()


async def stream(requests: Requests, batch: list[CloneRequest]) -> None:
    for request in batch:
        await requests.send(request)
        await asyncio.sleep(SEND_INTERVAL_S)


async def check_replication(cluster: OwnCluster, settings: WorkerSettings) -> None:
    """Every partition of the product's topics on all nodes, in sync again; a write needs two."""
    await cluster.wait_in_sync()
    product = set(settings.topics.all())
    partitions = [p for p in await cluster.partitions() if p["topic"] in product]
    assert len(partitions) == len(product) * PARTITIONS
    assert all(len(p["replicas"]) == CLUSTER_NODES for p in partitions), partitions
    for topic in product:
        assert await cluster.min_insync_replicas(topic) == CLUSTER_NODES - 1


@pytest.mark.parametrize("guarantee", list(ProcessingGuarantee))
async def test_cluster_chaos(
    own_cluster: OwnCluster,
    seed_server: SeedServer,
    tmp_path: Path,
    reference_wav: bytes,
    guarantee: ProcessingGuarantee,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seed_server.delay_seconds, seed_server.jitter_seconds = 0.05, 0.1
    seed_server.transient_failure_rate = 0.1
    kafka = KafkaSettings(
        bootstrap_servers=own_cluster.bootstrap,
        client_id="chaos",
        topic_replication_factor=CLUSTER_NODES,
    )
    settings = chaos_settings(kafka, tmp_path, seed_server, guarantee, reference_wav)
    await create_topics(settings, partitions=PARTITIONS)
    await own_cluster.wait_in_sync()

    async with chaos_run(settings, seed_server, REQUESTS, tmp_path, within_s=180) as chaos:
        sending = asyncio.create_task(stream(chaos.requests, chaos.batch))
        for fault in faults(own_cluster, settings):
            await kill_a_worker(chaos)
            await kill_node(own_cluster, fault, chaos)
        await sending

    counts = chaos.counts
    with capsys.disabled():
        print(f"\n{counts.line(f'cluster-chaos[{guarantee}]')}")
    expected = {"leader_kills": 1, "group_coordinator_kills": 1}
    if guarantee is ProcessingGuarantee.EXACTLY_ONCE:
        expected["transaction_coordinator_kills"] = 1
    with chaos.logs_on_failure():
        assert counts.faults == expected
        assert counts.kills == len(expected)
        assert counts.lost == 0
    await chaos.check(tmp_path)
    await check_replication(own_cluster, settings)


async def end_offset(bootstrap: str, topic: str) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        return (await consumer.end_offsets([tp]))[tp]
    finally:
        await consumer.stop()


async def test_an_outcome_waits_while_too_few_replicas_are_in_sync(own_cluster: OwnCluster) -> None:
    """The worker's publisher (acks=all) on a partition with two replicas, one of them killed:
    with one in sync where two are required, nothing is written and the publish waits; once
    the replica is back, the outcome is written, once."""
    run = uuid.uuid4().hex[:8]
    names = {kind: f"isr-{kind}-{run}" for kind in ("requests", "ready", "failed", "cancel", "dlq")}
    topics = Topics(
        requests=names["requests"],
        audio_ready=names["ready"],
        failed=names["failed"],
        cancel=names["cancel"],
        dlq=names["dlq"],
    )
    replicas, lost = [1, 2], 2
    async with own_cluster.admin() as admin:
        await admin.create_topics([NewTopic(topics.failed, -1, -1, {0: replicas})])
    await own_cluster.wait_in_sync()
    bootstrap = own_cluster.bootstrap
    publisher = OutcomePublisher(
        KafkaSettings(bootstrap_servers=bootstrap), topics, make_codec(None), ack_timeout_seconds=2
    )
    outcome = CloneFailed(
        request_id=run,
        tenant_id="tenant-a",
        error_code=ErrorCode.INFERENCE_FAILED,
        message="a test outcome",
        retryable=False,
        attempts=1,
        failed_at=datetime.now(UTC),
    )
    await publisher.start()
    try:
        await asyncio.to_thread(own_cluster.kill, lost)
        await own_cluster.wait_for_isr(topics.failed, set(replicas) - {lost})
        publishing = asyncio.create_task(publisher.publish(outcome))
        await asyncio.sleep(NODE_DOWN_S * 2)
        assert not publishing.done()
        assert await end_offset(bootstrap, topics.failed) == 0
        await asyncio.to_thread(own_cluster.start)
        await asyncio.wait_for(publishing, 60)
    finally:
        await publisher.stop()
    assert await end_offset(bootstrap, topics.failed) == 1
