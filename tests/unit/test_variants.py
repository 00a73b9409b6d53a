"""RayVariant against a stand-in for a Serve handle: a request that no replica takes (its node lost)
fails after ASSIGN_TIMEOUT_S instead of waiting for ever, and is withdrawn from Serve's queue; one queued
behind a busy replica (this router's calls or another router's) waits on, up to QUEUE_WAIT_S."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from serving.variants import client as variants


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
    app_name = "serving"
    deployment_name = "LLMServer:fp16"

    def __init__(self, assigned: bool) -> None:
        self.response = Response(assigned)

    def options(self, **_: object) -> Handle:
        return self

    @property
    def chat(self) -> Handle:
        return self

    def remote(self, *_: object) -> Response:
        return self.response


class Replicas(variants.ServeReplicas):
    """What Serve's controller would say: `counts` answered in turn (the last one from then on); None is a
    controller that did not answer."""

    def __init__(self, *counts: int | None) -> None:
        super().__init__("serving", "LLMServer:fp16")
        self.counts = list(counts)
        self.asked = 0

    def _count(self) -> int:
        self.asked += 1
        count = self.counts.pop(0) if len(self.counts) > 1 else self.counts[0]
        if count is None:
            raise ConnectionError("the Serve controller is gone")
        return count


@pytest.mark.parametrize("serve_says", [0, None], ids=["no-replica-running", "controller-silent"])
async def test_a_request_no_replica_takes_fails_within_the_bound(
    monkeypatch: pytest.MonkeyPatch, serve_says: int | None
) -> None:
    monkeypatch.setattr(variants, "ASSIGN_TIMEOUT_S", 0.05)
    stuck = Handle(assigned=False)
    replicas = Replicas(serve_says)
    with pytest.raises(variants.NoReplica, match="no replica took the request"):
        await anext(variants.RayVariant(stuck, replicas).call("chat", object()))
    assert stuck.response.cancelled
    assert replicas.asked == 1  # asked once, at the bound
    served = Handle(assigned=True)
    assert [item async for item in variants.RayVariant(served, Replicas(0)).call("chat", object())] == ["answer"]
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
    variant = variants.RayVariant(handle, Replicas(0))
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
    from serving.intake.admission import is_backpressure

    monkeypatch.setattr(variants, "ASSIGN_TIMEOUT_S", 0.02)
    monkeypatch.setattr(variants, "QUEUE_WAIT_S", 0.1)
    handle = Handle(assigned=True)
    variant = variants.RayVariant(handle, Replicas(0))
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


async def test_a_router_whose_calls_the_engine_never_took_waits_while_serve_counts_a_running_replica(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The defect CI found: two routers, the other holds every engine slot; this router has no call of its own
    # running, so its own calls cannot tell busy from missing. Serve's controller can: a RUNNING replica means
    # the request is in the queue, so it waits on and is taken (or, past QUEUE_WAIT_S, refused as a full engine).
    monkeypatch.setattr(variants, "ASSIGN_TIMEOUT_S", 0.02)
    monkeypatch.setattr(variants, "REPLICA_CHECK_TTL_S", 0.0)
    handle = Handle(assigned=True)
    taken = asyncio.Event()
    handle.response = Queued(taken)
    replicas = Replicas(1)
    queued = asyncio.ensure_future(anext(variants.RayVariant(handle, replicas).call("chat", object())))
    await asyncio.sleep(0.2)  # ten bounds' worth
    assert not queued.done()
    assert replicas.asked >= 2  # asked again at each bound
    taken.set()
    assert await queued == "answer"

    monkeypatch.setattr(variants, "QUEUE_WAIT_S", 0.1)
    handle.response = Queued(asyncio.Event())  # never taken
    with pytest.raises(variants.QueueWaitExceeded):
        await anext(variants.RayVariant(handle, Replicas(1)).call("chat", object()))

    # The replica goes away while the request waits (Serve stops counting it): then it is missing.
    monkeypatch.setattr(variants, "QUEUE_WAIT_S", 10.0)
    handle.response = Queued(asyncio.Event())
    with pytest.raises(variants.NoReplica):
        await anext(variants.RayVariant(handle, Replicas(1, 1, 0)).call("chat", object()))


async def test_many_waiters_share_one_question_to_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    # A full queue times out all at once: 128 blocking status calls would take the router's threads.
    monkeypatch.setattr(variants, "ASSIGN_TIMEOUT_S", 0.02)
    handle = Handle(assigned=False)
    replicas = Replicas(0)
    variant = variants.RayVariant(handle, replicas)
    waiters = [anext(variant.call("chat", object())) for _ in range(50)]
    outcomes = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(outcome, variants.NoReplica) for outcome in outcomes)
    assert replicas.asked == 1


def test_serve_replicas_counts_the_running_replicas_serve_status_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    # The real reading of serve.status() (the fakes above answer in its place): replica states are an enum of
    # strings; only RUNNING ones can take a request; an app or deployment Serve does not list has none.
    from ray import serve
    from ray.serve._private.common import ReplicaState
    from ray.serve.schema import ApplicationStatusOverview, DeploymentStatusOverview, ServeStatus

    deployment = DeploymentStatusOverview(
        status="HEALTHY",
        status_trigger="CONFIG_UPDATE_COMPLETED",
        replica_states={ReplicaState.RUNNING: 2, ReplicaState.STARTING: 1, ReplicaState.STOPPING: 3},
        message="",
    )
    app = ApplicationStatusOverview(
        status="RUNNING",
        message="",
        last_deployed_time_s=0.0,
        deployments={"LLMServer:fp16": deployment},
    )
    monkeypatch.setattr(serve, "status", lambda: ServeStatus(applications={"serving": app}))
    assert variants.ServeReplicas("serving", "LLMServer:fp16")._count() == 2
    assert variants.ServeReplicas("serving", "LLMServer:int8")._count() == 0
    assert variants.ServeReplicas("other", "LLMServer:fp16")._count() == 0
