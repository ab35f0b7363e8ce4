"""The offset tracker against a brute-force model, over random fetches and completion orders."""

import pytest
from aiokafka.structs import TopicPartition
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)

from consumer.worker import OffsetTracker

TP0 = TopicPartition("voice.clone.requests", 0)
TP1 = TopicPartition("voice.clone.requests", 1)


def test_commit_waits_for_the_lowest_unfinished_offset() -> None:
    tracker: OffsetTracker[TopicPartition] = OffsetTracker()
    for offset in (10, 11, 12):
        tracker.track(TP0, offset)

    tracker.done(TP0, 12)
    tracker.done(TP0, 11)
    assert tracker.committable() == {}  # 10 is still running

    tracker.done(TP0, 10)
    assert tracker.committable() == {TP0: 13}


def test_holes_in_fetched_offsets_do_not_block_the_commit() -> None:
    # 11 and 12 were transaction markers / compacted away and never fetched.
    tracker: OffsetTracker[TopicPartition] = OffsetTracker()
    tracker.track(TP0, 10)
    tracker.track(TP0, 13)
    tracker.track(TP0, 20)

    tracker.done(TP0, 10)
    assert tracker.committable() == {TP0: 13}
    tracker.done(TP0, 13)
    assert tracker.committable() == {TP0: 20}
    tracker.done(TP0, 20)
    assert tracker.committable() == {TP0: 21}


def test_partitions_advance_independently() -> None:
    tracker: OffsetTracker[TopicPartition] = OffsetTracker()
    tracker.track(TP0, 0)
    tracker.track(TP1, 100)
    tracker.track(TP1, 101)

    tracker.done(TP1, 100)

    assert tracker.committable() == {TP1: 101}
    assert tracker.in_flight(TP0) == 1
    assert tracker.in_flight(TP1) == 1
    assert tracker.in_flight() == 2


def test_committed_offsets_are_not_offered_again() -> None:
    tracker: OffsetTracker[TopicPartition] = OffsetTracker()
    tracker.track(TP0, 5)
    tracker.track(TP0, 6)
    tracker.done(TP0, 5)
    tracker.mark_committed(tracker.committable())
    assert tracker.committable() == {}

    tracker.done(TP0, 6)
    assert tracker.committable() == {TP0: 7}


def test_a_late_commit_result_does_not_move_the_mark_back() -> None:
    tracker: OffsetTracker[TopicPartition] = OffsetTracker()
    for offset in range(3):
        tracker.track(TP0, offset)
        tracker.done(TP0, offset)
    tracker.mark_committed({TP0: 3})
    tracker.mark_committed({TP0: 1})  # an older commit that completed later

    assert tracker.committable() == {}


def test_nothing_is_offered_before_the_first_completion() -> None:
    tracker: OffsetTracker[TopicPartition] = OffsetTracker()
    tracker.track(TP0, 42)

    assert tracker.committable() == {}


def test_forget_drops_state_and_ignores_late_completions() -> None:
    tracker: OffsetTracker[TopicPartition] = OffsetTracker()
    tracker.track(TP0, 1)
    tracker.track(TP1, 1)

    tracker.forget([TP0])

    assert tracker.done(TP0, 1) is False  # a revoked partition's task finishing late
    assert tracker.in_flight(TP0) == 0
    assert tracker.partitions() == [TP1]
    assert tracker.committable() == {}
    tracker.track(TP0, 0)  # reassigned and rewound: a fresh start is allowed


def test_offsets_must_increase_per_partition() -> None:
    tracker: OffsetTracker[TopicPartition] = OffsetTracker()
    tracker.track(TP0, 5)

    with pytest.raises(ValueError, match="not above"):
        tracker.track(TP0, 5)


def test_unknown_completions_change_nothing() -> None:
    tracker: OffsetTracker[TopicPartition] = OffsetTracker()
    tracker.track(TP0, 5)

    assert tracker.done(TP0, 4) is False
    assert tracker.done(TP0, 6) is False
    assert tracker.done(TP0, 5) is True
    assert tracker.done(TP0, 5) is False  # twice
    assert tracker.committable() == {TP0: 6}


@settings(max_examples=300)
@given(
    gaps=st.lists(st.integers(min_value=1, max_value=5), min_size=1, max_size=60),
    start=st.integers(min_value=0, max_value=10**12),
    data=st.data(),
)
def test_any_completion_order_ends_at_last_plus_one(
    gaps: list[int], start: int, data: st.DataObject
) -> None:
    offsets = []
    offset = start
    for gap in gaps:
        offsets.append(offset)
        offset += gap
    tracker: OffsetTracker[str] = OffsetTracker()
    for offset in offsets:
        tracker.track("p", offset)

    order = data.draw(st.permutations(offsets))
    previous = offsets[0]
    unfinished = set(offsets)
    for offset in order:
        tracker.done("p", offset)
        unfinished.discard(offset)
        point = tracker.committable().get("p", previous)
        assert point >= previous
        assert all(point <= pending for pending in unfinished)
        previous = point

    assert tracker.committable() == {"p": offsets[-1] + 1}
    assert tracker.in_flight() == 0


class TrackerMachine(RuleBasedStateMachine):
    """Interleaves fetches, completions, commits and revokes; a brute-force model checks."""

    in_flight = Bundle("in_flight")

    def __init__(self) -> None:
        super().__init__()
        self.tracker: OffsetTracker[int] = OffsetTracker()
        self.last: dict[int, int] = {}
        self.pending: dict[int, set[int]] = {}
        self.committed: dict[int, int] = {}

    @rule(
        target=in_flight,
        tp=st.integers(min_value=0, max_value=2),
        gap=st.integers(min_value=1, max_value=4),
    )
    def fetch(self, tp: int, gap: int) -> tuple[int, int]:
        offset = self.last.get(tp, -1) + gap
        self.tracker.track(tp, offset)
        self.last[tp] = offset
        self.pending.setdefault(tp, set()).add(offset)
        return tp, offset

    @rule(message=consumes(in_flight))
    def finish(self, message: tuple[int, int]) -> None:
        tp, offset = message
        known = offset in self.pending.get(tp, set())
        assert self.tracker.done(tp, offset) is known
        if known:
            self.pending[tp].discard(offset)

    @rule()
    def commit(self) -> None:
        offers = self.tracker.committable()
        for tp, point in offers.items():
            assert point > self.committed.get(tp, -1)  # monotonic, never offered twice
            self.committed[tp] = point
        self.tracker.mark_committed(offers)

    @precondition(lambda self: bool(self.last))
    @rule(tp=st.integers(min_value=0, max_value=2))
    def revoke(self, tp: int) -> None:
        self.tracker.forget([tp])
        # A later reassignment resumes from Kafka's committed offset, above anything seen.
        for model in (self.pending, self.committed):
            model.pop(tp, None)

    @invariant()
    def never_past_an_unfinished_offset(self) -> None:
        for tp, point in self.tracker.committable().items():
            assert all(point <= offset for offset in self.pending[tp])

    @invariant()
    def all_done_reaches_last_plus_one(self) -> None:
        offers = self.tracker.committable()
        for tp, offsets in self.pending.items():
            if not offsets and self.committed.get(tp) != self.last[tp] + 1:
                assert offers[tp] == self.last[tp] + 1

    @invariant()
    def counts_match(self) -> None:
        for tp, offsets in self.pending.items():
            assert self.tracker.in_flight(tp) == len(offsets)
        assert self.tracker.in_flight() == sum(len(offsets) for offsets in self.pending.values())


TestTrackerMachine = TrackerMachine.TestCase
TestTrackerMachine.settings = settings(max_examples=100, stateful_step_count=50)
