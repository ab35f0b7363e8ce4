"""Exactly-once outcomes: outcome events and the requests' offsets committed in one transaction.

`TransactionalPublisher` is the publisher of the `exactly_once` processing guarantee.
`publish` and `dead_letter` do not send: they stage the records under the partition and offset
of the request they answer. `commit(offsets)` then sends, per partition, in one Kafka
transaction, every staged record whose offset lies below the partition's committed offset,
together with that offset (`send_offsets_to_transaction`). A `read_committed` subscriber
therefore sees an outcome only once its request is committed as consumed, and never twice.

Each request partition has a transactional producer of its own, with the id
`<prefix>-<topic>-<partition>`: the same whichever worker holds the partition (Kafka's
exactly-once before KIP-447). `open` starts it when the partition is assigned; its
InitProducerId fences every earlier producer with that id (a crashed worker's, or a "zombie"'s
that lost the partition without knowing) and ends its open transaction, so nothing the old owner
still tries to commit for the partition gets in after the new owner has read its offset.
aiokafka sends transactional offsets without the group's generation, so that fence is the only
one. A fenced partition's staged work is dropped: its new owner redoes it.

Records staged beyond a gap (an earlier request still running) wait for a later commit; those
of revoked partitions are dropped by `close`, since their requests go to the new owner.
"""

import asyncio
import functools
import itertools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import structlog
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import (
    InvalidProducerEpoch,
    KafkaError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    ProducerFenced,
    TransactionalIdAuthorizationFailed,
)
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from producer.kafka_clients import MAX_RECORD_BYTES, outcome_producer
from producer.publisher import (
    Headers,
    OutcomeSink,
    PublisherHooks,
    RecordSource,
    enqueue,
    is_broker_outage,
)
from producer.settings import KafkaSettings
from schemas.codec import Codec
from schemas.topics import Topics

log = structlog.get_logger(__name__)

# A newer producer with the partition's transactional id exists: the partition is not ours.
_FENCED = (ProducerFenced, InvalidProducerEpoch)
# Errors after which aiokafka's transactional producer is unusable for good.
_FATAL = (OutOfOrderSequenceNumber, TransactionalIdAuthorizationFailed)


class TransactionsFailed(Exception):
    """A partition's transactional producer can no longer commit: a record refused for good
    (aiokafka's producer cannot go on after that) or the id not authorized. The worker must
    stop; its staged work is redone by whoever runs it next."""


def transactional_id(prefix: str, tp: TopicPartition) -> str:
    """The transactional id of the producer for request partition `tp`."""
    return f"{prefix}-{tp.topic}-{tp.partition}"


@dataclass(frozen=True, slots=True)
class _Staged:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: Headers


class TransactionalPublisher(OutcomeSink):
    """Stages outcomes by request partition and offset; `commit` publishes them with the
    offsets, atomically, through each partition's own transactional producer.

    `make_producer` builds a partition's producer, not started, from its transactional id; by
    default the worker's outcome producer (`producer.kafka_clients`) for `kafka`.
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        topics: Topics,
        codec: Codec,
        transactional_id_prefix: str,
        group_id: str,
        hooks: PublisherHooks | None = None,
        make_producer: Callable[[str], AIOKafkaProducer] | None = None,
    ) -> None:
        super().__init__(topics, codec, hooks=hooks)
        self._make_producer = (
            make_producer
            if make_producer is not None
            else functools.partial(outcome_producer, kafka)
        )
        self.transactional_id_prefix = transactional_id_prefix
        self._group_id = group_id
        self._staged: dict[TopicPartition, dict[int, list[_Staged]]] = {}
        self._producers: dict[TopicPartition, AIOKafkaProducer] = {}

    async def stop(self) -> None:
        await super().stop()
        await self.close(list(self._producers))

    async def open(self, partitions: Iterable[TopicPartition]) -> None:
        """Start the producers of newly assigned partitions, fencing their earlier owners'.

        Returns once each is initialised: from then on, an earlier owner's commit for the
        partition fails and its open transaction is aborted (or, when already being committed,
        complete), so the partition's committed offset is final until we commit again.
        """
        new = [tp for tp in partitions if tp not in self._producers]
        for tp in new:
            self._producers[tp] = self._make_producer(
                transactional_id(self.transactional_id_prefix, tp)
            )
        # At once: each is a round trip to the transaction coordinator, and the rebalance
        # waits for all of them.
        results = await asyncio.gather(
            *(self._producers[tp].start() for tp in new), return_exceptions=True
        )
        failed = [
            (tp, r) for tp, r in zip(new, results, strict=True) if isinstance(r, BaseException)
        ]
        if failed:
            # Not kept half started: a commit would wait on it for ever.
            await self.close([tp for tp, _ in failed])
            raise failed[0][1]

    async def close(self, partitions: Iterable[TopicPartition]) -> None:
        """Drop what was staged for partitions no longer ours and stop their producers (an open
        transaction of theirs is aborted by the next owner's `open`)."""
        producers = []
        for tp in partitions:
            self._staged.pop(tp, None)
            if (producer := self._producers.pop(tp, None)) is not None:
                producers.append(producer)
        await asyncio.gather(*(producer.stop() for producer in producers))

    async def _deliver(
        self,
        source: RecordSource | None,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: Headers,
    ) -> None:
        if source is None:
            raise ValueError("a transactional outcome needs the request record it answers")
        # Refused now, so the caller dead-letters it, rather than failing every commit after.
        size = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, list(headers))
        if size > MAX_RECORD_BYTES:
            raise MessageSizeTooLargeError(f"{size} bytes for {topic}, at most {MAX_RECORD_BYTES}")
        tp = TopicPartition(source.topic, source.partition)
        by_offset = self._staged.setdefault(tp, {})
        by_offset.setdefault(source.offset, []).append(_Staged(topic, key, value, headers))

    @property
    def staged(self) -> int:
        """Records staged and not yet committed."""
        return sum(len(r) for by_offset in self._staged.values() for r in by_offset.values())

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> dict[TopicPartition, int]:
        """Per partition, one transaction: the records staged below its offset, and the offset.

        Returns the offsets committed. A partition found fenced (or never opened) is left out
        and its staged work dropped: it is no longer ours. On any other KafkaError the
        partition's transaction is aborted, its records stay staged for the next call, and the
        first such error is raised once every partition was tried (a partition committed
        meanwhile is committed again, with nothing staged, at the next call). Raises
        TransactionsFailed when a producer cannot go on.
        """
        tps = list(offsets)
        results = await asyncio.gather(
            *(self._commit_partition(tp, offsets[tp]) for tp in tps), return_exceptions=True
        )
        committed: dict[TopicPartition, int] = {}
        failures: list[BaseException] = []
        for tp, result in zip(tps, results, strict=True):
            if isinstance(result, BaseException):
                failures.append(result)
            elif result:
                committed[tp] = offsets[tp]
        if failures:
            # A producer that cannot go on first: it decides whether the worker goes on.
            raise next((f for f in failures if isinstance(f, TransactionsFailed)), failures[0])
        self.connected = True
        return committed

    async def _commit_partition(self, tp: TopicPartition, end: int) -> bool:
        """Commit `tp` up to `end`; False when the partition turned out not to be ours."""
        staged = self._staged.get(tp, {})
        due = sorted(offset for offset in staged if offset < end)
        producer = self._producers.get(tp)
        if producer is None:  # fenced before, or revoked: the owner redoes it
            self._drop(tp, due)
            return False
        records = [record for offset in due for record in staged[offset]]
        name = transactional_id(self.transactional_id_prefix, tp)
        try:
            await self._transaction(producer, records, {tp: end})
        except _FENCED as exc:
            log.warning(
                "partition_fenced", transactional_id=name, dropped=len(due), error=repr(exc)
            )
            _read_fence(producer)
            self._drop(tp, due)
            await self.close([tp])
            return False
        except KafkaError as exc:
            if isinstance(exc, _FATAL) or not is_broker_outage(exc):
                raise TransactionsFailed(
                    f"transactional id {name!r}: {exc!r}. The broker refused a record for good "
                    "(check the outcome topics' max.message.bytes) or the id is not authorized; "
                    "exiting to be restarted"
                ) from exc
            self.connected = False
            raise
        self._drop(tp, due)
        return True

    def _drop(self, tp: TopicPartition, offsets: Iterable[int]) -> None:
        staged = self._staged.get(tp, {})
        for offset in offsets:
            staged.pop(offset, None)

    async def _transaction(
        self,
        producer: AIOKafkaProducer,
        records: list[_Staged],
        offsets: Mapping[TopicPartition, int],
    ) -> None:
        await producer.begin_transaction()
        try:
            acks = [await enqueue(producer, r.topic, r.key, r.value, r.headers) for r in records]
            for ack in acks:  # a failed transaction raises its own error; acks may go unread
                ack.add_done_callback(_retrieve)
            await producer.send_offsets_to_transaction(dict(offsets), self._group_id)
            for result in await asyncio.gather(*acks, return_exceptions=True):
                if isinstance(result, BaseException):  # the first refused record's error
                    raise result
            await producer.commit_transaction()
        except (*_FENCED, *_FATAL):
            raise
        except (KafkaError, asyncio.CancelledError):
            await asyncio.shield(_abort(producer))
            raise


async def _abort(producer: AIOKafkaProducer) -> None:
    try:
        await producer.abort_transaction()
    except (*_FENCED, *_FATAL):
        raise
    except KafkaError as exc:
        # Left open, the broker aborts it after the transaction timeout.
        log.warning("transaction_abort_failed", error=repr(exc))


def _read_fence(producer: AIOKafkaProducer) -> None:
    """Mark the fence as seen where aiokafka also leaves it, on futures that nobody awaits once
    the producer is dropped (its transaction waiter, its batches' drain waiters), so asyncio
    does not log each as "Future exception was never retrieved". aiokafka's private state, read
    defensively: its minor version is pinned, and the fencing test fails if anything is left."""
    txn = getattr(producer, "_txn_manager", None)
    waiters = [getattr(txn, "_transaction_waiter", None)]
    accumulator = getattr(producer, "_message_accumulator", None)
    for batch in (
        *itertools.chain.from_iterable(getattr(accumulator, "_batches", {}).values()),
        *getattr(accumulator, "_pending_batches", ()),
    ):
        waiters.append(getattr(batch, "_drain_waiter", None))
    for waiter in waiters:
        if isinstance(waiter, asyncio.Future) and waiter.done():
            _retrieve(waiter)


def _retrieve(ack: asyncio.Future[object]) -> None:
    """Mark an ack's error as seen, so asyncio does not report it as never retrieved."""
    if not ack.cancelled():
        ack.exception()
