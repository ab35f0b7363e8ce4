"""Exactly-once outcomes: outcome events and the requests' offsets committed in one transaction.

`TransactionalPublisher` is the `OutcomePublisher` of the `exactly_once` processing guarantee.
`publish` and `dead_letter` do not send: they stage the records under the offset of the request
they answer. `commit(offsets)` then sends, in one Kafka transaction, every staged record whose
offset lies below the committed offset of its partition, together with those offsets
(`send_offsets_to_transaction`). A `read_committed` subscriber therefore sees an outcome only
once its request is committed as consumed, and never twice: a crash aborts the open
transaction (at the latest after the transaction timeout; at once when a worker with the same
transactional id starts) and the requests are redone with nothing of the first try visible.

Records staged beyond a gap (an earlier request still running) wait for a later commit; those
of revoked partitions are dropped by `forget`, since their requests go to the new owner.
"""

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import structlog
from aiokafka import TopicPartition
from aiokafka.errors import (
    KafkaError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    ProducerFenced,
    TransactionalIdAuthorizationFailed,
)
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from producer.publisher import (
    MAX_RECORD_BYTES,
    OutcomePublisher,
    PublisherHooks,
    RecordSource,
    is_broker_outage,
)
from producer.settings import KafkaSettings
from schemas.codec import Codec
from schemas.topics import Topics

log = structlog.get_logger(__name__)

# Errors after which aiokafka's transactional producer is unusable for good.
_FATAL = (ProducerFenced, OutOfOrderSequenceNumber, TransactionalIdAuthorizationFailed)


class TransactionsFailed(Exception):
    """The transactional producer can no longer commit: fenced by a newer instance with the same
    transactional id, or a record refused for good (aiokafka's producer cannot go on after
    that). The worker must stop; its staged work is redone by whoever runs it next."""


@dataclass(frozen=True, slots=True)
class _Staged:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]


class TransactionalPublisher(OutcomePublisher):
    """Stages outcomes by request offset; `commit` publishes them with the offsets, atomically."""

    def __init__(
        self,
        kafka: KafkaSettings,
        topics: Topics,
        codec: Codec,
        transactional_id: str,
        group_id: str,
        hooks: PublisherHooks | None = None,
    ) -> None:
        self.transactional_id = transactional_id
        self._group_id = group_id
        self._staged: dict[TopicPartition, dict[int, list[_Staged]]] = {}
        super().__init__(kafka, topics, codec, hooks=hooks)

    def _producer_options(self) -> dict[str, object]:
        return {"transactional_id": self.transactional_id}

    async def _deliver(
        self,
        source: RecordSource | None,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes | None]],
    ) -> None:
        if source is None:
            raise ValueError("a transactional outcome needs the request record it answers")
        # Refused now, so the caller dead-letters it, rather than failing every commit after.
        size = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers)
        if size > MAX_RECORD_BYTES:
            raise MessageSizeTooLargeError(f"{size} bytes for {topic}, at most {MAX_RECORD_BYTES}")
        tp = TopicPartition(source.topic, source.partition)
        by_offset = self._staged.setdefault(tp, {})
        by_offset.setdefault(source.offset, []).append(_Staged(topic, key, value, headers))

    @property
    def staged(self) -> int:
        """Records staged and not yet committed."""
        return sum(len(r) for by_offset in self._staged.values() for r in by_offset.values())

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Publish the records staged below `offsets` and commit `offsets`, in one transaction.

        On a KafkaError the transaction is aborted, everything stays staged for the next call,
        and the error is raised. Raises TransactionsFailed when the producer cannot go on.
        """
        due = {
            tp: sorted(offset for offset in self._staged.get(tp, {}) if offset < end)
            for tp, end in offsets.items()
        }
        records = [r for tp, found in due.items() for o in found for r in self._staged[tp][o]]
        try:
            await self._transaction(records, offsets)
        except KafkaError as exc:
            if isinstance(exc, _FATAL) or not is_broker_outage(exc):
                raise TransactionsFailed(
                    f"transactional id {self.transactional_id!r}: {exc!r}. Either a newer worker "
                    "took this id over or the broker refused a record for good (check the outcome "
                    "topics' max.message.bytes); exiting to be restarted"
                ) from exc
            self._hooks.connected(False)
            raise
        for tp, found in due.items():
            for offset in found:
                del self._staged[tp][offset]
        self._hooks.connected(True)

    async def _transaction(
        self, records: list[_Staged], offsets: Mapping[TopicPartition, int]
    ) -> None:
        await self._producer.begin_transaction()
        try:
            acks = [await self._enqueue(r.topic, r.key, r.value, r.headers) for r in records]
            for ack in acks:  # a failed transaction raises its own error; acks may go unread
                ack.add_done_callback(_retrieve)
            await self._producer.send_offsets_to_transaction(dict(offsets), self._group_id)
            for result in await asyncio.gather(*acks, return_exceptions=True):
                if isinstance(result, BaseException):  # the first refused record's error
                    raise result
            await self._producer.commit_transaction()
        except _FATAL:
            raise
        except (KafkaError, asyncio.CancelledError):
            await asyncio.shield(self._abort())
            raise

    async def _abort(self) -> None:
        try:
            await self._producer.abort_transaction()
        except _FATAL:
            raise
        except KafkaError as exc:
            # Left open, the broker aborts it after the transaction timeout.
            log.warning("transaction_abort_failed", error=repr(exc))

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        """Drop what was staged for revoked partitions: their requests are redone elsewhere."""
        for tp in partitions:
            self._staged.pop(tp, None)


def _retrieve(ack: asyncio.Future[object]) -> None:
    """Mark an ack's error as seen, so asyncio does not report it as never retrieved."""
    if not ack.cancelled():
        ack.exception()
