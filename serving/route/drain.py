"""Draining on shutdown: requests in flight finish, new ones are refused cleanly, for a bounded time.

Ray Serve's own stop (`serve.shutdown`) drains each replica, but kills the HTTP proxy at once, and every answer
still streaming through it is cut. So `serving serve`, on SIGTERM or Ctrl-C, drains first, and stops Serve after:

1. it asks the rollout controller to begin a drain (`DrainBook.begin`);
2. each router replica hears it on its next sync (every 0.5 s; `DrainGate.report`) and from then on answers every
   new request with a 503 `shutting_down` and Retry-After, and `/ready` with 503 (a load balancer stops sending),
   while the requests it holds run to their end;
3. `wait_for_drain` returns once every router replica has said it drains and holds no request, or when the
   router's `graceful_shutdown_timeout_s` has passed; then Serve and Ray stop (new connections are refused).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from serving.errors import Unavailable

# A router replica that has not reported for this long is taken for gone (stopped, or its node lost): a drain does
# not wait on it.
STALE_S = 5.0
RETRY_AFTER_S = 5  # time for a load balancer to mark this server out, or for a restarted one to come up
# Paths a draining router still answers as usual: liveness (the process is alive) and readiness (it says 503).
PROBES = frozenset({"/health", "/ready"})
# On a draining router's answers: the client opens a new connection for its next request, so once the server has
# stopped that request meets a refused connection, not a kept-alive one closed under it.
CLOSE = {"connection": "close"}


def shutting_down() -> Unavailable:
    return Unavailable(
        "the server is shutting down; retry shortly (another replica or the restarted server takes the request)",
        code="shutting_down",
        headers={"retry-after": str(RETRY_AFTER_S)},
    )


class Drain:
    """A router replica's side: whether it drains, and the requests it holds (a streamed answer until its last
    byte or the client leaving)."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0

    def report(self, replica: str) -> RouterReport:
        return RouterReport(replica, self.draining, self.in_flight)


class DrainGate:
    """ASGI middleware of a router replica: counts the requests in flight and, while draining, refuses new ones
    with `shutting_down` (the probes answer as usual)."""

    def __init__(self, app: ASGIApp, drain_of: Callable[[], Drain]) -> None:
        self.app = app
        self.drain_of = drain_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PROBES:
            await self.app(scope, receive, send)
            return
        drain = self.drain_of()
        if drain.draining:
            refusal = shutting_down()
            await JSONResponse(refusal.body(), status_code=refusal.status, headers={**refusal.headers, **CLOSE})(
                scope, receive, send
            )
            return
        drain.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            drain.in_flight -= 1


@dataclass(frozen=True, slots=True)
class RouterReport:
    """What a router replica tells the controller on each sync."""

    replica: str
    draining: bool
    in_flight: int


@dataclass(frozen=True, slots=True)
class DrainStatus:
    """The drain as the controller sees it: router replicas that reported lately, how many of them drain, and the
    requests they hold."""

    began: bool
    routers: int
    draining: int
    in_flight: int

    def done(self) -> bool:
        return self.began and self.draining == self.routers and self.in_flight == 0


class DrainBook:
    """Held by the rollout controller (the one actor every router replica syncs with): whether a drain has begun,
    and what each router replica said last."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.began = False
        self.reports: dict[str, tuple[RouterReport, float]] = {}

    def begin(self) -> None:
        self.began = True

    def report(self, report: RouterReport) -> bool:
        """Records a replica's report; answers whether it must drain."""
        self.reports[report.replica] = (report, self.clock())
        return self.began

    def status(self) -> DrainStatus:
        now = self.clock()
        fresh = [report for report, at in self.reports.values() if now - at <= STALE_S]
        return DrainStatus(
            began=self.began,
            routers=len(fresh),
            draining=sum(r.draining for r in fresh),
            in_flight=sum(r.in_flight for r in fresh),
        )


def wait_for_drain(
    status: Callable[[], DrainStatus],
    bound_s: float,
    *,
    poll_s: float = 0.2,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> DrainStatus:
    """Polls the drain until it is done or `bound_s` has passed; returns the last status seen (not done: the
    requests still in flight when the bound ran out, which the stop that follows cuts)."""
    deadline = clock() + bound_s
    while True:
        seen = status()
        if seen.done() or clock() >= deadline:
            return seen
        sleep(poll_s)
