"""One way for a test to wait for something: poll a condition until it holds, or fail the test saying what
did not happen. Never a bare sleep standing in for "long enough"."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

import pytest

T = TypeVar("T")


def poll_until(check: Callable[[], T], what: str, *, timeout_s: float = 30, interval_s: float = 0.5) -> T:
    """Calls `check` until it returns something truthy, and returns that; fails the test after `timeout_s`,
    naming `what` was awaited and the last value seen."""
    deadline = time.monotonic() + timeout_s
    while True:
        if _holds(value := check(), deadline, what, timeout_s):
            return value
        time.sleep(interval_s)


async def poll_until_async(check: Callable[[], T], what: str, *, timeout_s: float = 10, interval_s: float = 0.05) -> T:
    """`poll_until` inside a running event loop: the loop runs on (the awaited work progresses) between checks."""
    deadline = time.monotonic() + timeout_s
    while True:
        if _holds(value := check(), deadline, what, timeout_s):
            return value
        await asyncio.sleep(interval_s)


def _holds(value: object, deadline: float, what: str, timeout_s: float) -> bool:
    """Whether the awaited value has come; fails the test once the deadline has passed without it."""
    if value:
        return True
    if time.monotonic() >= deadline:
        pytest.fail(f"timed out after {timeout_s} s waiting for {what}; last seen: {value!r}")
    return False
