"""The consume loop and how it commits: fetch within the in-flight bound, run each request,
commit finished prefixes.

One loop, read top to bottom: make room (pause/resume), fetch, start a task per record, commit
what is contiguous (at most every `commit_interval_seconds`; at once on drain and revocation).
The loop's tenant admission (`consumer.admission`), handed to each record it starts, decides
which of them run and which wait for their tenant's turn, holding no slot. Each record's task
always ends in a published outcome or a dead letter before its offset is marked done; nothing
is committed on cancellation. Run until idle, the loop also ends once its partitions are read
to their end and nothing is in flight.

Beside the loop it keeps the facts readiness reads (`LoopFacts`, plain fields) and the
consume-side metrics up to date, and runs the lag monitor as a task of its own, started and
stopped with the consumer.

The module reads from its pieces up to the loop: which offsets of a partition may be committed
(`OffsetTracker`), how they are committed under each processing guarantee (`Commits`), then
the loop itself (`Worker`).
"""

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError, KafkaTimeoutError

from consumer.admission import TenantAdmission
from consumer.handler import RecordHandler
from consumer.observability.health import LoopFacts
from consumer.observability.lag import LagMonitor
from consumer.settings import WorkerSettings
from consumer.telemetry import Metrics
from producer.transactions import TransactionalPublisher

log = structlog.get_logger(__name__)

# --- which offsets may be committed ---------------------------------------------------------------
# Per-partition offset tracking for a worker that finishes messages out of order.
#
# The worker hands messages to concurrent tasks, so outcomes are published in any order. A
# partition's committed offset may only move past a message once that message's outcome is
# published, otherwise a crash would lose it. The safe commit point of a partition is therefore
# its lowest unfinished offset, or one past the last fetched offset when nothing is unfinished.
#
# Kafka offsets are not contiguous (transaction markers and compaction leave holes), so
# "contiguous" here means "no fetched-but-unfinished offset below", never "every integer below
# was seen". Pure bookkeeping, no I/O: the consumer loop calls it and does the committing.

P = TypeVar("P", bound=Hashable)


@dataclass
class _Partition:
    """Bookkeeping for one assigned partition."""

    # Fetched offsets in increasing order, finished ones dropped lazily from the left: the
    # head is then the lowest unfinished offset, found in amortised O(1).
    order: deque[int] = field(default_factory=deque)
    pending: set[int] = field(default_factory=set)
    last_tracked: int = -1
    # Highest commit offset known to be stored (or the start position): nothing to gain below.
    committed: int = -1

    def commit_point(self) -> int:
        """The Kafka commit offset: the next offset a restarted consumer must read."""
        self.drop_finished_head()
        return self.order[0] if self.order else self.last_tracked + 1

    def drop_finished_head(self) -> None:
        while self.order and self.order[0] not in self.pending:
            self.order.popleft()


class OffsetTracker(Generic[P]):
    """Tracks in-flight offsets per partition and says what may be committed.

    Keys are usually ``aiokafka.structs.TopicPartition`` but any hashable works. Every
    operation is amortised O(1), so thousands of in-flight messages cost nothing noticeable.
    """

    def __init__(self) -> None:
        self._partitions: dict[P, _Partition] = {}

    def track(self, tp: P, offset: int) -> None:
        """Record a fetched message as handed to processing.

        Offsets must increase per partition (the order Kafka delivers them in); holes are
        fine. After a seek back or a reassignment, ``forget`` the partition first.
        """
        state = self._partitions.get(tp)
        if state is None:
            # Nothing before the first fetched offset is ours to commit.
            state = self._partitions[tp] = _Partition(committed=offset)
        elif offset <= state.last_tracked:
            raise ValueError(
                f"offset {offset} for {tp} is not above the last tracked {state.last_tracked}"
            )
        state.order.append(offset)
        state.pending.add(offset)
        state.last_tracked = offset

    def done(self, tp: P, offset: int) -> bool:
        """Record that a message's outcome is published; any order.

        Returns False, changing nothing, for an offset that is not in flight: tasks of a
        revoked partition still finish after ``forget`` and must not disturb anything.
        """
        state = self._partitions.get(tp)
        if state is None or offset not in state.pending:
            return False
        state.pending.remove(offset)
        state.drop_finished_head()  # keeps memory bounded by the in-flight window
        return True

    def committable(self) -> dict[P, int]:
        """Per partition, the commit offset where it advanced beyond the last one committed."""
        result: dict[P, int] = {}
        for tp, state in self._partitions.items():
            point = state.commit_point()
            if point > state.committed:
                result[tp] = point
        return result

    def mark_committed(self, offsets: Mapping[P, int]) -> None:
        """Record offsets the broker accepted; stale or unknown partitions are ignored.

        Commits are awaited while processing goes on, so an older result may arrive after a
        newer one; the committed mark only ever moves forward.
        """
        for tp, offset in offsets.items():
            state = self._partitions.get(tp)
            if state is not None:
                state.committed = max(state.committed, offset)

    def in_flight(self, tp: P | None = None) -> int:
        """Unfinished messages of one partition, or of all of them."""
        if tp is not None:
            state = self._partitions.get(tp)
            return 0 if state is None else len(state.pending)
        return sum(len(state.pending) for state in self._partitions.values())

    def forget(self, tps: Iterable[P]) -> None:
        """Drop the state of revoked partitions; late ``done`` calls for them are ignored."""
        for tp in tps:
            self._partitions.pop(tp, None)

    def next_offset(self, tp: P) -> int | None:
        """One past the last offset tracked for `tp`; None before its first."""
        state = self._partitions.get(tp)
        return None if state is None else state.last_tracked + 1

    def partitions(self) -> list[P]:
        """Partitions with state, for example to wait for their in-flight work on revoke."""
        return list(self._partitions)


# --- how they are committed -----------------------------------------------------------------------
# Chosen once, with the processing guarantee. `Commits` is what the consume loop calls, knowing
# nothing of the guarantee: `commit` with the offsets below which every request of a partition
# is done, `assigned` and `revoked` from the rebalance listener. `PlainCommits`
# (`at_least_once`) commits offsets through the consumer, the outcomes being acknowledged
# already; `TransactionalCommits` (`exactly_once`) commits them in each partition's transaction
# with the outcomes staged below them (producer/transactions.py).


class Commits(Protocol):
    async def assigned(self, consumer: AIOKafkaConsumer, partitions: set[TopicPartition]) -> None:
        """Make newly assigned partitions ready to read; they are paused until this returns."""
        ...

    async def commit(
        self, consumer: AIOKafkaConsumer, offsets: Mapping[TopicPartition, int]
    ) -> Mapping[TopicPartition, int]:
        """Commit `offsets`; returns those committed. Raises KafkaError when it failed."""
        ...

    async def revoked(self, partitions: set[TopicPartition]) -> None:
        """Let go of revoked partitions, after their last commit."""
        ...


class PlainCommits:
    """Offsets committed by the consumer, failing after `timeout_seconds`: aiokafka retries a
    commit for as long as the group coordinator cannot be reached, and would hold the loop (and
    a drain) for as long as an outage lasts, the failure never reported."""

    def __init__(self, timeout_seconds: float) -> None:
        self._timeout = timeout_seconds

    async def assigned(self, consumer: AIOKafkaConsumer, partitions: set[TopicPartition]) -> None:
        pass

    async def commit(
        self, consumer: AIOKafkaConsumer, offsets: Mapping[TopicPartition, int]
    ) -> Mapping[TopicPartition, int]:
        try:
            async with asyncio.timeout(self._timeout):
                await consumer.commit(dict(offsets))
        except TimeoutError:
            raise KafkaTimeoutError(
                f"offset commit not answered within {self._timeout:g} s"
            ) from None
        return offsets

    async def revoked(self, partitions: set[TopicPartition]) -> None:
        pass


class TransactionalCommits:
    """Offsets committed in each partition's transaction, with the outcomes staged below them."""

    def __init__(self, publisher: TransactionalPublisher) -> None:
        self._publisher = publisher

    async def assigned(self, consumer: AIOKafkaConsumer, partitions: set[TopicPartition]) -> None:
        await self._publisher.open(partitions)
        # aiokafka fetches a new partition's committed offset beside the rebalance listener,
        # so it may have read it before the fence: what a fenced owner committed since then
        # would be redone. Read it again now that it can no longer change under us.
        for tp in partitions:
            if (committed := await consumer.committed(tp)) is not None:
                consumer.seek(tp, committed)

    async def commit(
        self, consumer: AIOKafkaConsumer, offsets: Mapping[TopicPartition, int]
    ) -> Mapping[TopicPartition, int]:
        return await self._publisher.commit(offsets)

    async def revoked(self, partitions: set[TopicPartition]) -> None:
        await self._publisher.close(partitions)


# --- the consume loop -----------------------------------------------------------------------------

# How often the loop tries again to make ready partitions whose readying failed (exactly_once:
# their transaction coordinator did not answer): without it they would wait, unread, for the
# next rebalance, which a group with one member may never have.
_READY_RETRY_SECONDS = 5.0


class Worker:
    """Runs clone requests from the requests topic until `stop()` is called.

    `consumer` is the group member to read them with, not started: `run` starts, subscribes
    and stops it (`producer.kafka_clients.worker_consumer`; tests give an in-memory one).
    `metrics` defaults to ones nobody serves, for callers that do not look at them.
    `commits` is how finished offsets are committed (`Commits`, above); by default by the
    consumer, outcomes being already acknowledged (`at_least_once`). `facts` is what the loop
    knows that readiness asks about, read by `Health` (its `loop_facts`).
    """

    def __init__(
        self,
        settings: WorkerSettings,
        consumer: AIOKafkaConsumer,
        handler: RecordHandler,
        metrics: Metrics | None = None,
        commits: Commits | None = None,
    ) -> None:
        self._settings = settings
        self._handler = handler
        self._commits = (
            commits if commits is not None else PlainCommits(settings.broker_timeout_seconds)
        )
        self._metrics = metrics if metrics is not None else Metrics.unexported()
        self.facts = LoopFacts()
        self._tracker: OffsetTracker[TopicPartition] = OffsetTracker()
        # Partitions paused for good: their next record cannot be parsed (_isolate_unreadable).
        self._unreadable: set[TopicPartition] = set()
        # Partitions assigned and paused until `Commits.assigned` has made them ready to read.
        self._not_ready: set[TopicPartition] = set()
        self._tasks: dict[asyncio.Task[None], TopicPartition] = {}
        self._slot_freed = asyncio.Event()
        # Which started records run and which wait for their tenant's turn; one that starts
        # waiting gives its slot back.
        self._admission = TenantAdmission(
            settings.limits.max_in_flight_per_tenant, on_wait=self._slot_freed.set
        )
        self._stopping = asyncio.Event()
        self._consumer = consumer
        self._last_commit = 0.0  # time.monotonic() of the loop's last commit
        # One commit at a time: a revocation's (run by aiokafka's group task) waits for the
        # loop's. A partition's transaction cannot begin while another is open, and the revoked
        # partitions' offsets must be in before the next owner reads them.
        self._committing = asyncio.Lock()
        # One change of the partitions' readiness at a time: the listener's (assigned, revoked)
        # and the loop's retries of those that failed to become ready.
        self._readying = asyncio.Lock()
        self._ready_retry_at = 0.0  # time.monotonic() when the loop next retries them

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def stop(self) -> None:
        """Ask the loop to drain and exit; safe to call more than once, from a signal handler."""
        self._stopping.set()

    async def run_until_idle(self) -> None:
        """Run until every partition assigned is read to its end and nothing is in flight,
        then commit and return, as after `stop()`: a one-shot batch job, or a test's "records
        in, outcomes out". Meant for a group's only member: it ends when its own partitions
        are done, whatever the others' are."""
        await self.run(until_idle=True)

    async def run(self, until_idle: bool = False) -> None:
        consumer = self._consumer
        lag: asyncio.Task[None] | None = None
        try:
            await consumer.start()
            lag = asyncio.create_task(
                LagMonitor(self._metrics).run(consumer, self._tracker.in_flight), name="lag"
            )
            consumer.subscribe([self._settings.topics.requests], listener=_Rebalances(self))
            await self._consume(until_idle)
        finally:
            if lag is not None:
                lag.cancel()
                await asyncio.gather(lag, return_exceptions=True)
            try:
                await self._drain()
            finally:
                await consumer.stop()
                log.info("worker_stopped")

    async def _consume(self, until_idle: bool) -> None:
        while not self._stopping.is_set():
            free = self._free_slots()
            self._apply_backpressure(free)
            if free <= 0:
                await self._wait_for_slot()
                if self._free_slots() > 0:
                    # Resume before polling: a poll while paused drops the records fetched
                    # ahead, and the freed slot would wait a fetch round trip (bench/).
                    continue
            # Full or not, poll: it is what keeps us in the group while long jobs run. When
            # full, every partition is paused, so the poll returns at once and fetches nothing.
            try:
                batch = await self._consumer.getmany(
                    timeout_ms=self._settings.poll_timeout_ms if free > 0 else 0,
                    max_records=max(free, 1),
                )
            except UnicodeDecodeError:  # aiokafka's record parser: a header name not UTF-8
                await self._isolate_unreadable()
                continue
            self.facts.last_poll = time.monotonic()
            for records in batch.values():
                for record in records:
                    self._start(record)
            await self._commit_if_due()
            await self._retry_not_ready()
            if until_idle and not batch and await self._idle():
                log.info("worker_idle")
                return

    async def _idle(self) -> bool:
        """Nothing in flight, and every partition of ours that can be read is read to its end
        (its last stable offset, reading committed transactions only)."""
        if self._tasks or not self._consumer.assignment():  # not joined yet: nothing is known
            return False
        readable = list(self._consumer.assignment() - self._unreadable)
        ends = await self._consumer.end_offsets(readable) if readable else {}
        for tp, end in ends.items():
            if await self._consumer.position(tp) < end:
                return False
        return True

    def _free_slots(self) -> int:
        """How many more records to start now.

        Records waiting for their tenant's turn (`limits.max_in_flight_per_tenant`) take no
        slot of `max_in_flight`, so a tenant with a backlog cannot fill the worker and starve
        the others; up to `max_waiting` of them are held, in memory and uncommitted, beyond it.
        """
        settings = self._settings
        running = self.in_flight - self._admission.waiting
        held_at_most = settings.max_in_flight + settings.max_waiting
        return min(settings.max_in_flight - running, held_at_most - self.in_flight)

    def _apply_backpressure(self, free: int) -> None:
        if free <= 0:
            self._consumer.pause(*self._consumer.assignment())
        elif paused := self._consumer.paused() - self._unreadable - self._not_ready:
            self._consumer.resume(*paused)

    async def _isolate_unreadable(self) -> None:
        """Keep serving every partition but one whose next record aiokafka cannot parse.

        aiokafka fails a whole poll on such a record, and then on every fetch of its batch: no
        consumer of ours can read past it. Its partition is paused for as long as it is ours
        (its lag grows; the log says where the record is, for an operator to move the group's
        offset past its batch); the poll's other records are read again, one at a time, since
        the failed poll may have consumed records of other partitions without returning them.
        """
        for tp in self._consumer.assignment():
            self._consumer.seek(tp, await self._resume_point(tp))
        for tp in self._consumer.assignment() - self._consumer.paused():
            await self._read_one_by_one(tp)

    async def _read_one_by_one(self, tp: TopicPartition) -> None:
        """Start `tp`'s records one at a time while slots are free, up to one that cannot be
        parsed: then pause `tp` at it."""
        while self._free_slots() > 0:
            try:
                batch = await self._consumer.getmany(
                    tp, timeout_ms=self._settings.poll_timeout_ms, max_records=1
                )
            except UnicodeDecodeError as exc:
                await self._pause_unreadable(tp, exc)
                return
            if not batch:
                return
            self._start(batch[tp][0])

    async def _pause_unreadable(self, tp: TopicPartition, error: UnicodeDecodeError) -> None:
        offset = await self._resume_point(tp)
        self._consumer.seek(tp, offset)
        self._consumer.pause(tp)
        self._unreadable.add(tp)
        log.error("partition_unreadable", partition=tp.partition, offset=offset, error=str(error))

    async def _resume_point(self, tp: TopicPartition) -> int:
        """The offset after the last record of `tp` this worker started; before the first, the
        group's committed offset or, with none, the beginning (auto_offset_reset earliest)."""
        if (offset := self._tracker.next_offset(tp)) is not None:
            return offset
        if (committed := await self._consumer.committed(tp)) is not None:
            return committed
        return (await self._consumer.beginning_offsets([tp]))[tp]

    async def _wait_for_slot(self) -> None:
        self._slot_freed.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._settings.poll_timeout_ms / 1000):
                await self._slot_freed.wait()

    def _start(self, record: ConsumerRecord) -> None:
        tp = TopicPartition(record.topic, record.partition)
        self._tracker.track(tp, record.offset)
        task = asyncio.create_task(self._handle(tp, record), name=f"record-{tp.partition}")
        self._tasks[task] = tp
        task.add_done_callback(self._finished)
        log.debug(  # per record: at INFO it costs the loop more than it tells (bench/)
            "record_started",
            partition=record.partition,
            offset=record.offset,
            in_flight=len(self._tasks),
        )

    async def _handle(self, tp: TopicPartition, record: ConsumerRecord) -> None:
        with self._metrics.in_flight():
            await self._handler.handle(record, self._admission)
            # Only reached once the outcome (or dead letter) is acknowledged by the broker.
            self._tracker.done(tp, record.offset)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)
        self._slot_freed.set()
        if not task.cancelled() and (exc := task.exception()) is not None:
            # The handler turns every failure into an outcome or a dead letter; reaching here
            # means even the dead letter failed. The offset stays uncommitted (redelivered).
            log.error("handler_crashed", error=repr(exc))

    async def _commit_if_due(self) -> None:
        now = time.monotonic()
        if now - self._last_commit >= self._settings.commit_interval_seconds:
            self._last_commit = now
            await self._commit()

    async def _commit(self, only: Iterable[TopicPartition] = ()) -> None:
        async with self._committing:
            await self._commit_now(only)

    async def _commit_now(self, only: Iterable[TopicPartition] = ()) -> None:
        offsets = self._tracker.committable()
        if wanted := set(only):
            offsets = {tp: off for tp, off in offsets.items() if tp in wanted}
        if not offsets:
            if not only:  # nothing left to commit, so nothing failing either
                self.facts.commit_failure = None
            return
        try:
            committed = await self._commits.commit(self._consumer, offsets)
        except KafkaError as exc:  # CommitFailedError and IllegalStateError included
            # Uncommitted work is redelivered to whoever owns the partition next.
            log.warning("commit_failed", error=repr(exc))
            self._metrics.commit_failed()
            self.facts.commit_failure = repr(exc)
        else:
            self._tracker.mark_committed(committed)
            self.facts.commit_failure = None

    async def _settle(self, tasks: list[asyncio.Task[None]], grace: float) -> None:
        """Let tasks finish within `grace` seconds, then cancel the rest (left uncommitted)."""
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=grace)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _drain(self) -> None:
        self._consumer.pause(*self._consumer.assignment())
        log.info("worker_draining", in_flight=self.in_flight)
        await self._settle(list(self._tasks), self._settings.shutdown_grace_seconds)
        await self._commit()

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        if not revoked:  # the first join "revokes" the empty assignment
            return
        mine = [task for task, tp in self._tasks.items() if tp in revoked]
        log.info("partitions_revoked", partitions=_names(revoked), in_flight=len(mine))
        try:
            await self._settle(mine, self._settings.revoke_grace_seconds)
            await self._commit(only=revoked)
        finally:
            # Whatever the commit did, the partitions are no longer ours: nothing of theirs may
            # go into a later commit, which would repeat what their next owner redoes.
            self._tracker.forget(revoked)
            self._unreadable -= revoked
            self._not_ready -= revoked
            async with self._readying:  # not while the loop is making them ready
                await self._commits.revoked(revoked)
            # Last, so a lag measured while the revoked work finished is not left behind.
            self._metrics.rebalanced("revoked", revoked)
            self.facts.assigned -= revoked

    async def on_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info("partitions_assigned", partitions=_names(assigned))
        if not assigned:  # more workers than partitions: this one gets none
            return
        self._metrics.rebalanced("assigned", assigned)
        self.facts.assigned |= assigned
        # New partitions start unpaused, and the loop polls while this runs: paused until
        # ready (exactly_once: the earlier owner fenced, the position read after), and
        # resumed by the loop once there is room.
        self._consumer.pause(*assigned)
        self._not_ready |= assigned
        await self._make_ready(assigned)

    async def _make_ready(self, partitions: set[TopicPartition]) -> None:
        """Make assigned partitions ready to read (`Commits.assigned`); on failure they stay
        paused, and the loop tries again every `_READY_RETRY_SECONDS`."""
        async with self._readying:
            partitions = partitions & self._not_ready  # those revoked meanwhile are not ours
            if not partitions:
                return
            try:
                await self._commits.assigned(self._consumer, partitions)
            except Exception:
                # Left unread rather than read unfenced: their lag shows it meanwhile.
                log.exception(
                    "partitions_not_ready",
                    partitions=_names(partitions),
                    retry_in_seconds=_READY_RETRY_SECONDS,
                )
                self._ready_retry_at = time.monotonic() + _READY_RETRY_SECONDS
                return
            self._not_ready -= partitions

    async def _retry_not_ready(self) -> None:
        if self._not_ready and time.monotonic() >= self._ready_retry_at:
            await self._make_ready(set(self._not_ready))


class _Rebalances(ConsumerRebalanceListener):
    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._worker.on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._worker.on_assigned(set(assigned))


def _names(tps: Iterable[TopicPartition]) -> list[str]:
    return sorted(f"{tp.topic}:{tp.partition}" for tp in tps)
