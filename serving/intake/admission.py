"""Whether a request may go to the engines now: per-key rate limits on requests and tokens per minute,
and what to tell a client refused because an engine's queue is full. A refusal is fast and says when
to come back (Retry-After): a client that waits is never queued without bound.

Limits are per router replica (each holds its own buckets), like feedback's.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from typing import Any

from serving.config import LimitsConfig
from serving.errors import TooManyRequests, Unavailable
from serving.variants.client import Endpoint, EngineRequest, QueueWaitExceeded

CHARS_PER_TOKEN = 4  # a prompt's tokens, estimated before tokenizing (the engine tokenizes)
ENGINE_BUSY_RETRY_S = 1
# A variant with no replica: Serve starts a new one in 15 to 30 s on the demo stack; clients (the openai SDK
# among them) wait this long before their retry instead of at once.
VARIANT_DOWN_RETRY_S = 5


class RateLimit:
    """At most `per_minute` units per key, as a token bucket refilled continuously."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self.clock = clock
        self.buckets: dict[str, tuple[float, float]] = {}  # key -> (units, at)

    def take(self, key: str, amount: float = 1.0) -> float:
        """Takes `amount` (at most a full bucket: a large request waits for a full one, never forever);
        returns 0, or the seconds until that much is available (nothing taken)."""
        amount = min(amount, float(self.per_minute))
        now = self.clock()
        units, at = self.buckets.get(key, (float(self.per_minute), now))
        units = min(float(self.per_minute), units + (now - at) * self.per_minute / 60)
        if units < amount:
            self.buckets[key] = (units, now)
            return (amount - units) * 60 / self.per_minute
        self.buckets[key] = (units - amount, now)
        return 0.0


def token_cost(endpoint: Endpoint, request: EngineRequest, prompt_chars: int | None = None) -> int:
    """What a request may cost in tokens, known before it runs: its prompt, estimated from its length in
    characters (`prompt_chars`, as the router measured it on the raw body; measured here when not given),
    plus its output's upper bound for every choice. Charged whole at admission (the answer may be shorter)."""
    prompt: Any = request.prompt if endpoint == "completions" else None
    if isinstance(prompt, list) and prompt and all(isinstance(x, int) for x in prompt):
        prompt_tokens = len(prompt)  # token ids: counted exactly
    else:
        if prompt_chars is None and isinstance(prompt, str):
            prompt_chars = len(prompt)
        elif prompt_chars is None:
            text = json.dumps(
                prompt if endpoint == "completions" else request.messages, default=str, ensure_ascii=False
            )
            prompt_chars = len(text)
        prompt_tokens = math.ceil(prompt_chars / CHARS_PER_TOKEN)
    output = getattr(request, "max_completion_tokens", None) or request.max_tokens or 0
    return prompt_tokens + output * (request.n or 1)


class KeyQuotas:
    """Requests and tokens per minute, per API key."""

    def __init__(self, limits: LimitsConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.requests: RateLimit | None = None
        self.tokens: RateLimit | None = None
        self.configure(limits)

    def configure(self, limits: LimitsConfig) -> None:
        """Takes new limits; buckets already filling keep their state where the limit is unchanged."""
        self.requests = resized(self.requests, limits.requests_per_minute, self.clock)
        self.tokens = resized(self.tokens, limits.tokens_per_minute, self.clock)

    def admit(self, key_id: str, tokens: int) -> None:
        """Raises `TooManyRequests` with Retry-After when this key is over either limit (nothing is taken)."""
        if self.requests is not None:
            wait_s = self.requests.take(key_id)
            if wait_s:
                raise over(f"at most {self.requests.per_minute} requests per minute for this key", wait_s)
        if self.tokens is not None:
            wait_s = self.tokens.take(key_id, tokens)
            if wait_s:
                if self.requests is not None:
                    self.requests.take(key_id, -1.0)  # refused: the request does not count
                raise over(f"at most {self.tokens.per_minute} tokens per minute for this key", wait_s)


def resized(limit: RateLimit | None, per_minute: int | None, clock: Callable[[], float]) -> RateLimit | None:
    if per_minute is None:
        return None
    if limit is None or limit.per_minute != per_minute:
        return RateLimit(per_minute, clock)
    return limit


def over(message: str, wait_s: float) -> TooManyRequests:
    return TooManyRequests(message, code="rate_limited", headers={"retry-after": str(max(1, math.ceil(wait_s)))})


def engine_busy(variant: str) -> Unavailable:
    """An engine's queue is full (Ray Serve's BackPressureError): refused at once, to be retried shortly."""
    return Unavailable(
        f"variant {variant} is at capacity; retry shortly",
        code="engine_overloaded",
        headers={"retry-after": str(ENGINE_BUSY_RETRY_S)},
    )


def variant_down(variant: str) -> Unavailable:
    """A variant failed before its answer began (no replica, the replica died, the engine failed)."""
    return Unavailable(
        f"variant {variant} is unavailable; retry shortly",
        code="variant_unavailable",
        headers={"retry-after": str(VARIANT_DOWN_RETRY_S)},
    )


def is_backpressure(exc: BaseException) -> bool:
    """Whether an engine call failed because its queue is full (also when it crossed a process wrapped)."""
    from ray.serve.exceptions import BackPressureError

    full = (BackPressureError, QueueWaitExceeded)  # a request that waited its bound in a queue counts as full
    return isinstance(exc, full) or isinstance(getattr(exc, "cause", None), full)
