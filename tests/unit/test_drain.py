"""The drain on shutdown (serving.route.drain): a router replica refuses new requests while those it holds run to their
end, the controller's book tells the driver when every replica is done, and the wait is bounded. Fakes only."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from serving.config import load_config
from serving.route.core import RouterCore, create_app
from serving.route.drain import DrainBook, DrainStatus, RouterReport, wait_for_drain
from serving.variants.client import FakeVariant
from tests.clock import Clock as HandClock
from tests.polling import poll_until_async

REPO = Path(__file__).resolve().parents[2]
PREMIUM = {"authorization": "Bearer demo-premium"}
CHAT = {"model": "demo-chat", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}


class Clock(HandClock):
    def sleep(self, seconds: float) -> None:
        self.now += seconds


def router_client(core: RouterCore) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(lambda: core)), base_url="http://router")


async def stream_in_flight(client: httpx.AsyncClient, core: RouterCore) -> asyncio.Task[httpx.Response]:
    """Starts a streamed chat and returns once the router holds it."""
    streaming = asyncio.create_task(client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=PREMIUM))
    await poll_until_async(lambda: core.drain.in_flight == 1, "the stream to be in flight")
    return streaming


@pytest.fixture
def core() -> RouterCore:
    config = load_config(REPO / "deploy" / "demo.yaml")
    answer = " ".join(f"word{i}" for i in range(20))
    variants = {name: FakeVariant(name, chunk_delay_s=0.02, answer=answer) for name in config.variants}
    return RouterCore(config, variants)


async def test_a_stream_in_flight_ends_whole_while_new_requests_are_refused(core: RouterCore) -> None:
    async with router_client(core) as client:
        streaming = await stream_in_flight(client, core)
        core.drain.draining = True

        refused = await client.post("/v1/chat/completions", json=CHAT, headers=PREMIUM)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "shutting_down"
        assert set(refused.json()["error"]) == {"message", "type", "param", "code"}
        assert int(refused.headers["retry-after"]) > 0
        assert refused.headers["connection"] == "close"
        ready = await client.get("/ready")
        assert ready.status_code == 503
        assert ready.headers["connection"] == "close"
        assert ready.json()["draining"] is True
        assert (await client.get("/health")).status_code == 200  # alive: a liveness probe must not restart it
        assert core.drain.in_flight == 1  # refusals and probes are not counted as held

        whole = await streaming
        events = [e.removeprefix("data: ") for e in whole.text.split("\n\n") if e]
        assert whole.status_code == 200
        assert events[-1] == "[DONE]"
        words = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])
        assert words.split() == [f"word{i}" for i in range(20)]
        assert core.drain.in_flight == 0
        assert core.drain.report("r1") == RouterReport("r1", draining=True, in_flight=0)


async def test_a_client_that_leaves_is_no_longer_held(core: RouterCore) -> None:
    async with router_client(core) as client:
        streaming = await stream_in_flight(client, core)
        streaming.cancel()
        await poll_until_async(lambda: core.drain.in_flight == 0, "the request to be let go")


def test_the_book_is_done_once_every_live_router_drains_and_holds_nothing() -> None:
    clock = Clock()
    book = DrainBook(clock)
    assert book.report(RouterReport("a", draining=False, in_flight=3)) is False  # no drain yet
    assert book.report(RouterReport("b", draining=False, in_flight=0)) is False
    assert not book.status().done()

    book.begin()
    assert book.report(RouterReport("a", draining=False, in_flight=3)) is True  # told; not draining yet
    assert book.status() == DrainStatus(began=True, routers=2, draining=0, in_flight=3)
    book.report(RouterReport("a", draining=True, in_flight=1))
    book.report(RouterReport("b", draining=True, in_flight=0))
    assert not book.status().done()  # a's last stream still runs
    book.report(RouterReport("a", draining=True, in_flight=0))
    assert book.status().done()


def test_a_router_that_stopped_reporting_is_not_waited_for() -> None:
    clock = Clock()
    book = DrainBook(clock)
    book.begin()
    book.report(RouterReport("gone", draining=False, in_flight=2))
    clock.sleep(3.0)
    book.report(RouterReport("live", draining=True, in_flight=0))
    assert not book.status().done()
    clock.sleep(3.0)  # "gone" last spoke 6 s ago: past STALE_S
    book.report(RouterReport("live", draining=True, in_flight=0))
    assert book.status() == DrainStatus(began=True, routers=1, draining=1, in_flight=0)
    assert book.status().done()


def test_the_wait_ends_when_drained() -> None:
    clock = Clock()
    seen = iter([DrainStatus(True, 2, 1, 4), DrainStatus(True, 2, 2, 1), DrainStatus(True, 2, 2, 0)])
    left = wait_for_drain(lambda: next(seen), 30.0, poll_s=0.2, clock=clock, sleep=clock.sleep)
    assert left.done()
    assert clock.now == pytest.approx(1000.4)


def test_the_wait_is_bounded_and_says_what_is_cut() -> None:
    clock = Clock()
    left = wait_for_drain(lambda: DrainStatus(True, 2, 2, 3), 5.0, poll_s=0.2, clock=clock, sleep=clock.sleep)
    assert not left.done()
    assert left.in_flight == 3
    assert 1005.0 <= clock.now < 1005.3
