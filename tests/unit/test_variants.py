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


class Queued(Response):
    """A request Serve holds in its queue until `taken` is set."""

    def __init__(self, taken: asyncio.Event) -> None:
        super().__init__(assigned=False)
        self.taken = taken

    async def _fetch_future_result_async(self) -> None:
        await self.taken.wait()


async def test_a_request_queued_behind_a_busy_replica_waits_on_and_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    # Not "no replica": the replica works on another call of this router, so the request is in Serve's bounded
    # queue. Seen on the real stack, where such requests failed after 10 s as the variant's errors.
    monkeypatch.setattr(variants, "ASSIGN_TIMEOUT_S", 0.05)
    handle = Handle(assigned=True)
    variant = variants.RayVariant(handle)
    working = variant.call("chat", object())
    assert await anext(working) == "answer"  # taken, still open: the replica works on it
    taken = asyncio.Event()
    handle.response = Queued(taken)
    queued = asyncio.ensure_future(anext(variant.call("chat", object())))
    await asyncio.sleep(0.2)  # four bounds' worth
    assert not queued.done()
    taken.set()
    assert await queued == "answer"
    await working.aclose()


async def test_a_request_that_waits_its_whole_bound_in_a_queue_is_refused_as_a_full_engine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from serving.admission import is_backpressure

    monkeypatch.setattr(variants, "ASSIGN_TIMEOUT_S", 0.02)
    monkeypatch.setattr(variants, "QUEUE_WAIT_S", 0.1)
    handle = Handle(assigned=True)
    variant = variants.RayVariant(handle)
    working = variant.call("chat", object())
    await anext(working)
    handle.response = Queued(asyncio.Event())  # never taken
    with pytest.raises(variants.QueueWaitExceeded) as refused:
        await anext(variant.call("chat", object()))
    assert is_backpressure(refused.value)  # a 503 engine_overloaded with Retry-After, counted as rejected
    assert handle.response.cancelled  # withdrawn from Serve's queue
    await working.aclose()
    # Once nothing of ours runs and nothing moved for a whole bound, the replica is missing, not busy.
    await asyncio.sleep(0.05)
    with pytest.raises(variants.NoReplica):
        await anext(variant.call("chat", object()))
