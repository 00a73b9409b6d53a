"""RayVariant against a stand-in for a Serve handle: a request that no replica takes (its node lost)
fails after ASSIGN_TIMEOUT_S instead of waiting for ever, and is withdrawn from Serve's queue."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from serving import variants


class Response:
    def __init__(self, assigned: bool) -> None:
        self.assigned = assigned
        self.cancelled = False

    async def _fetch_future_result_async(self) -> None:
        if not self.assigned:
            await asyncio.Event().wait()  # Serve queues it until a replica exists

    def cancel(self) -> None:
        self.cancelled = True

    async def __aiter__(self) -> Any:
        yield "answer"


class Handle:
    def __init__(self, assigned: bool) -> None:
        self.response = Response(assigned)

    def options(self, **_: object) -> Handle:
        return self

    @property
    def chat(self) -> Handle:
        return self

    def remote(self, *_: object) -> Response:
        return self.response


async def test_a_request_no_replica_takes_fails_within_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(variants, "ASSIGN_TIMEOUT_S", 0.05)
    stuck = Handle(assigned=False)
    with pytest.raises(variants.NoReplica, match="no replica took the request"):
        await anext(variants.RayVariant(stuck).call("chat", object()))
    assert stuck.response.cancelled
    served = Handle(assigned=True)
    assert [item async for item in variants.RayVariant(served).call("chat", object())] == ["answer"]
    assert not served.response.cancelled
