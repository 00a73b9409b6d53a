"""The router side of the rollout: what one router replica knows of the controller and tells it.

A `Follower` holds the live weights the controller hands out, the signals waiting to be delivered, and
the vote-taking for feedback; `RouterCore` asks it and knows nothing of the controller. The controller is
reached through a `ControllerLink`: `RayController` (the named actor, in a deployment) or `LocalController`
(a `Rollout` in this process: tests, several replicas sharing one). Without a link (unit tests of the
router alone) the config's weights hold and votes are remembered by this replica.

Delivery is at least once: a batch of signals stays with the router until the controller acknowledged
it (its `report` call returned), and is sent again with the same batch id otherwise; the controller
drops a batch id it has already taken, so a retried batch is not judged twice.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict, deque
from typing import Any, Protocol

from serving.config import Config
from serving.errors import Unavailable
from serving.rollout.signals import Signal, Snapshot
from serving.route.drain import RouterReport

logger = logging.getLogger("serving.rollout")

MAX_PENDING_SIGNALS = 50_000  # signals waiting for the controller; the oldest go first if it is away
MAX_BATCH = 5_000  # signals in one report: a controller back after a long absence is not sent one huge call
VOTE_TIMEOUT_S = 5.0


class ControllerLink(Protocol):
    """The calls a router makes to the rollout controller."""

    async def report(self, batch: str, signals: list[Signal]) -> None: ...

    async def snapshot(self, known_version: int) -> Snapshot: ...

    async def take_vote(self, response_id: str) -> bool: ...

    async def status(self) -> dict[str, Any]: ...


class Votes:
    """Response ids this replica took feedback on (bounded: the oldest are forgotten): the memory of
    votes when no controller is attached (tests) or it does not answer; otherwise the controller takes
    every replica's votes, so a repeat is refused on whichever replica it lands."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self.ids: OrderedDict[str, None] = OrderedDict()

    def add(self, response_id: str) -> bool:
        """Records a vote; False if this response already had one."""
        if response_id in self.ids:
            return False
        self.ids[response_id] = None
        if len(self.ids) > self.capacity:
            self.ids.popitem(last=False)
        return True


class Follower:
    def __init__(self, controller: ControllerLink | None = None) -> None:
        self.controller = controller
        # None (no controller) means the config's weights. With one, candidates get no traffic until it
        # answers: a restarted router must never bring back a weight that the controller rolled back.
        self.live_weights: dict[str, float] | None = None if controller is None else {}
        self.weights_changed_at: dict[str, float] = {}
        self.signals: deque[Signal] = deque(maxlen=MAX_PENDING_SIGNALS)
        self.unacknowledged: tuple[str, list[Signal]] | None = None  # the batch sent and not yet acknowledged
        self.sender = secrets.token_hex(8)  # names this replica's batches
        self.batches = 0
        self.votes = Votes()

    # -- what the router asks ------------------------------------------------------------------------
    def weight(self, config: Config, tier: str) -> float:
        if self.live_weights is None:
            return config.tiers[tier].weight
        return self.live_weights.get(tier, 0.0)

    def record(self, signal: Signal) -> None:
        self.signals.append(signal)

    async def take_vote(self, response_id: str) -> bool:
        """True if this is the first vote on the answer, asked of the controller when one is attached."""
        if self.controller is None:
            return self.votes.add(response_id)
        try:
            return await asyncio.wait_for(self.controller.take_vote(response_id), VOTE_TIMEOUT_S)
        except Exception as exc:
            # The vote still counts once in the controller's window (it dedups by response id); only this
            # replica's feedback counter could count a repeat that reached another replica.
            logger.warning("the controller did not take a vote (%r); this replica's memory decides", exc)
            return self.votes.add(response_id)

    async def status(self) -> dict[str, Any]:
        if self.controller is None:
            raise Unavailable("no rollout controller is attached to this router", code="no_controller")
        try:
            status = await self.controller.status()
        except Exception as exc:  # restarting, or gone: the routers look it up again within a second
            logger.warning("the rollout controller did not answer a status request: %r", exc)
            raise Unavailable("the rollout controller did not answer; retry shortly", code="no_controller") from None
        status["router"] = {"live_weights": self.live_weights, "weights_changed_at": self.weights_changed_at}
        return status

    # -- what the controller tells -------------------------------------------------------------------
    def follow(self, weights: dict[str, float]) -> None:
        """Takes the controller's live weights (the weights, phases and rollbacks are its own metrics, emitted
        once by it)."""
        now = time.time()
        for tier, weight in weights.items():
            if self.live_weights is None or self.live_weights.get(tier) != weight:
                self.weights_changed_at[tier] = now
        self.live_weights = dict(weights)

    async def deliver(self) -> int:
        """Sends the pending signals, one batch at a time, each until acknowledged; returns how many the
        controller took. A failure leaves the batch for the next call, with the same id."""
        delivered = 0
        assert self.controller is not None
        while True:
            if self.unacknowledged is None:
                if not self.signals:
                    return delivered
                batch = [self.signals.popleft() for _ in range(min(MAX_BATCH, len(self.signals)))]
                self.batches += 1
                self.unacknowledged = (f"{self.sender}-{self.batches}", batch)
            batch_id, batch = self.unacknowledged
            await self.controller.report(batch_id, batch)
            self.unacknowledged = None
            delivered += len(batch)

    async def sync(self, known_version: int) -> Snapshot:
        """Delivers the signals, then takes the controller's snapshot (the caller applies a new config)
        and its live weights."""
        assert self.controller is not None
        await self.deliver()
        return await self.controller.snapshot(known_version)


class LocalController:
    """A `Rollout` in this process behind the router's link (tests; one shared by several replicas)."""

    def __init__(self, rollout: Any) -> None:
        self.rollout = rollout

    async def report(self, batch: str, signals: list[Signal]) -> None:
        self.rollout.report(signals, batch)

    async def snapshot(self, known_version: int) -> Snapshot:
        snapshot: Snapshot = self.rollout.snapshot(known_version)
        return snapshot

    async def take_vote(self, response_id: str) -> bool:
        taken: bool = self.rollout.take_vote(response_id)
        return taken

    async def status(self) -> dict[str, Any]:
        status: dict[str, Any] = self.rollout.status().model_dump(mode="json")
        return status


class RayController:
    """The controller actor, found (or started) by name; `reconnect` looks it up again after a failure."""

    def __init__(self, config_json: str) -> None:
        from serving.rollout.controller import controller

        self.config_json = config_json
        self.handle = controller(config_json)

    def reconnect(self) -> None:
        """A controller that died for good (one that failed in its constructor is not restarted by Ray)
        leaves its name free: look it up again, starting a new one from the state file if it is gone."""
        from serving.rollout.controller import controller

        self.handle = controller(self.config_json, recover=True)

    async def report(self, batch: str, signals: list[Signal]) -> None:
        await self.handle.report.remote(signals, batch)

    async def snapshot(self, known_version: int) -> Snapshot:
        snapshot: Snapshot = await self.handle.snapshot.remote(known_version)
        return snapshot

    async def take_vote(self, response_id: str) -> bool:
        taken: bool = await self.handle.take_vote.remote(response_id)
        return taken

    async def status(self) -> dict[str, Any]:
        status: dict[str, Any] = await self.handle.status.remote()
        return status

    async def drain_report(self, report: RouterReport) -> bool:
        """Tells the controller how this replica drains; answers whether it must (serving.route.drain)."""
        draining: bool = await self.handle.drain_report.remote(report)
        return draining
