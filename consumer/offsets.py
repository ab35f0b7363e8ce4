"""Per-partition offset tracking for a worker that finishes messages out of order.

The worker hands messages to concurrent tasks, so outcomes are published in any order. A
partition's committed offset may only move past a message once that message's outcome is
published, otherwise a crash would lose it. The safe commit point of a partition is therefore
its lowest unfinished offset, or one past the last fetched offset when nothing is unfinished.

Kafka offsets are not contiguous (transaction markers and compaction leave holes), so
"contiguous" here means "no fetched-but-unfinished offset below", never "every integer below
was seen". Pure bookkeeping, no I/O: the consumer loop calls it and does the committing.
"""

from collections import deque
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

P = TypeVar("P", bound=Hashable)

__all__ = ["OffsetTracker"]


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
