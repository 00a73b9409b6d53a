"""The shared wait helper: a wait that times out fails the test, saying what it waited for."""

from __future__ import annotations

import asyncio

import pytest

from tests.polling import poll_until, poll_until_async


def test_a_condition_that_never_holds_fails_the_test() -> None:
    with pytest.raises(pytest.fail.Exception, match="waiting for the impossible; last seen: 0"):
        poll_until(lambda: 0, "the impossible", timeout_s=0.05, interval_s=0.01)


def test_the_first_truthy_value_is_returned() -> None:
    seen = iter([0, 0, 7])
    assert poll_until(lambda: next(seen), "a value", timeout_s=5, interval_s=0.001) == 7


async def test_the_async_helper_lets_the_loop_run_and_fails_on_timeout() -> None:
    done: list[int] = []

    async def work() -> None:
        done.append(1)

    task = asyncio.create_task(work())
    assert await poll_until_async(lambda: done, "the task to run", timeout_s=5, interval_s=0.001) == [1]
    await task
    with pytest.raises(pytest.fail.Exception, match="waiting for nothing"):
        await poll_until_async(lambda: False, "nothing", timeout_s=0.05, interval_s=0.01)
