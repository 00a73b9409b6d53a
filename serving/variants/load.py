"""How busy each engine is with primary requests, as this router sees it: the signal that sheds shadows.

The router knows, at no cost, which primary calls it is waiting on. The number in flight at one instant
says little: clients that send their next request as soon as the last is answered, and answers of equal
length that finish together, leave a variant idle for an instant between two batches. What decides
whether a shadow would compete with primaries is how busy the engine has been lately: the number of
primaries in flight averaged over about the last second (an exponentially weighted time average).
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable
from typing import Any

AVERAGE_OVER_S = 1.0


class EngineLoad:
    """Primary calls in flight to one engine: now, and averaged over about the last `average_over_s`."""

    def __init__(self, average_over_s: float = AVERAGE_OVER_S, clock: Callable[[], float] = time.monotonic) -> None:
        # Weak: a call whose response was dropped before its stream ever ran (the client left) is
        # forgotten with it instead of counting forever.
        self.calls: weakref.WeakSet[Any] = weakref.WeakSet()
        self.average_over_s = average_over_s
        self.clock = clock
        self.level = 0  # calls in flight since `at`
        self.average = 0.0
        self.at = clock()

    def advance(self) -> None:
        """Folds the time since the last change into the average, at the level it was."""
        now = self.clock()
        decay = math.exp(-(now - self.at) / self.average_over_s)
        self.average = self.level + (self.average - self.level) * decay
        self.level, self.at = len(self.calls), now

    def started(self, call: Any) -> None:
        self.advance()
        self.calls.add(call)
        self.level = len(self.calls)

    def finished(self, call: Any) -> None:
        self.advance()
        self.calls.discard(call)
        self.level = len(self.calls)

    def now(self) -> int:
        return len(self.calls)

    def recent(self) -> float:
        """Calls in flight, averaged over about the last `average_over_s` seconds."""
        self.advance()
        return self.average
