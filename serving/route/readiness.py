"""Ready means warm: every variant answers a real one-token generation.

`/ready` asks each variant for one (the same check the variant's replica passed before it took
traffic), at most once per `cache_s`, one check at a time, each bounded by `timeout_s`: probes
from load balancers cannot load the engines, and a hung engine reads as not ready, never as a hang.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

from serving.variants.client import VariantClient

logger = logging.getLogger("serving.route.readiness")


class Readiness:
    def __init__(self, *, cache_s: float = 5.0, timeout_s: float = 30.0) -> None:
        self.cache_s = cache_s
        self.timeout_s = timeout_s
        self.checked_at = -float("inf")
        self.states: dict[str, bool] = {}
        self.lock = asyncio.Lock()

    async def check(self, variants: Mapping[str, VariantClient]) -> dict[str, bool]:
        async with self.lock:
            if time.monotonic() - self.checked_at >= self.cache_s or set(self.states) != set(variants):
                answers = await asyncio.gather(*(self.generates(name, c) for name, c in variants.items()))
                self.states = dict(zip(variants, answers, strict=True))
                self.checked_at = time.monotonic()
            return dict(self.states)

    async def generates(self, name: str, client: VariantClient) -> bool:
        try:
            return await asyncio.wait_for(client.healthy(), self.timeout_s)
        except TimeoutError:
            logger.warning("variant %s did not generate one token within %.0f s", name, self.timeout_s)
            return False
