"""The one retry loop: exponential, jittered waits, and every bound on trying again."""

import asyncio
import time

import pytest

from producer.retry import RetryPolicy, retry, retry_while


class Flaky(Exception):
    """A failure the tests call transient."""


class Broken(Exception):
    """A failure the tests call permanent."""


def transient(exc: Exception) -> bool:
    return isinstance(exc, Flaky)


class Operation:
    """Fails with the given errors in turn, then returns the number of calls."""

    def __init__(self, *failures: Exception) -> None:
        self.failures = list(failures)
        self.calls = 0
        self.started: list[float] = []

    async def __call__(self) -> int:
        self.calls += 1
        self.started.append(time.monotonic())
        if self.failures:
            raise self.failures.pop(0)
        return self.calls


# The bounds are checked against when the next attempt is due; asyncio.sleep may wake later.
SLEEP_OVERSHOOT = 0.05


def fast(**bounds: float | int | None) -> RetryPolicy:
    return RetryPolicy(initial_backoff_seconds=0.01, max_backoff_seconds=0.02, **bounds)


def test_waits_double_up_to_the_cap_and_are_jittered_within_half_to_all() -> None:
    policy = RetryPolicy(initial_backoff_seconds=1, max_backoff_seconds=10)
    exact = RetryPolicy(initial_backoff_seconds=1, max_backoff_seconds=10, jitter=False)

    assert [exact.backoff(n) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    for n, nominal in enumerate([1, 2, 4, 8, 10, 10], start=1):
        waits = {policy.backoff(n) for _ in range(200)}
        assert all(nominal / 2 <= wait <= nominal for wait in waits)
        assert len(waits) > 100  # spread, not one value


async def test_transient_failures_are_retried_until_success() -> None:
    operation = Operation(Flaky(), Flaky())
    retried: list[None] = []

    result = await retry(
        operation,
        transient=transient,
        policy=fast(max_attempts=3),
        what="test",
        on_retry=lambda: retried.append(None),
    )

    assert (result, operation.calls, len(retried)) == (3, 3, 2)


async def test_the_last_error_is_raised_once_attempts_run_out() -> None:
    last = Flaky("third")
    operation = Operation(Flaky("first"), Flaky("second"), last, Flaky("never tried"))
    retried: list[None] = []

    with pytest.raises(Flaky) as raised:
        await retry(
            operation,
            transient=transient,
            policy=fast(max_attempts=3),
            what="test",
            on_retry=lambda: retried.append(None),
        )

    assert raised.value is last
    assert (operation.calls, len(retried)) == (3, 2)


async def test_a_permanent_failure_is_raised_at_once() -> None:
    operation = Operation(Flaky(), Broken(), Flaky())

    with pytest.raises(Broken):
        await retry(operation, transient=transient, policy=fast(max_attempts=5), what="test")

    assert operation.calls == 2


async def test_no_attempt_starts_later_than_max_seconds_after_the_first() -> None:
    operation = Operation(*[Flaky() for _ in range(1000)])

    with pytest.raises(Flaky):
        await retry(operation, transient=transient, policy=fast(max_seconds=0.3), what="test")

    assert operation.calls > 5  # it did retry in the meantime
    assert max(operation.started) - operation.started[0] <= 0.3 + SLEEP_OVERSHOOT


async def test_no_attempt_starts_past_the_deadline() -> None:
    operation = Operation(*[Flaky() for _ in range(1000)])
    deadline = time.monotonic() + 0.3

    with pytest.raises(Flaky):
        await retry(operation, transient=transient, policy=fast(), what="test", deadline=deadline)

    assert operation.calls > 5
    assert max(operation.started) < deadline + SLEEP_OVERSHOOT


async def test_a_wait_that_wakes_past_the_deadline_starts_no_attempt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    last = Flaky("the only attempt")
    operation = Operation(last, Flaky("never tried"))
    deadline = time.monotonic() + 0.1
    oversleep = asyncio.sleep

    async def late(seconds: float) -> None:  # a busy loop: the wait fits, the wake-up does not
        await oversleep(seconds + 0.15)

    monkeypatch.setattr("producer.retry.asyncio.sleep", late)
    with pytest.raises(Flaky) as raised:
        await retry(operation, transient=transient, policy=fast(), what="test", deadline=deadline)

    assert raised.value is last
    assert operation.calls == 1


async def test_retry_while_has_no_bound_and_waits_the_same_each_time() -> None:
    operation = Operation(*[Flaky() for _ in range(5)])

    assert await retry_while(transient, operation, backoff_seconds=0.01, what="test") == 6
    gaps = [b - a for a, b in zip(operation.started, operation.started[1:], strict=False)]
    assert all(gap >= 0.01 for gap in gaps)
