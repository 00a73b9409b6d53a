"""The router side of the rollout: several router replicas in front of one controller (a `Rollout`
in memory, no Ray), as in production."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from serving.config import Config, load_config
from serving.metrics import sample as metric_sample
from serving.rollout.controller import Rollout
from serving.rollout.follower import Follower, LocalController
from serving.rollout.signals import ComparisonSignal, FeedbackSignal, RequestSignal, Signal
from serving.route.core import RouterCore, create_app
from serving.variants.client import FakeVariant
from tests.clock import Clock

REPO = Path(__file__).resolve().parents[2]
CHAT = {"model": "demo-chat", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
PREMIUM = {"authorization": "Bearer demo-premium"}


def config(tmp_path: Path) -> Config:
    loaded = load_config(REPO / "deploy" / "demo.yaml")
    rollback = loaded.rollback.model_copy(update={"state_file": tmp_path / "state.json"})
    return loaded.model_copy(update={"rollback": rollback})


def replica(rollout: Rollout) -> RouterCore:
    """One router replica attached to the shared controller, as serving.deploy.app attaches it."""
    variants = {name: FakeVariant(name) for name in rollout.config.variants}
    core = RouterCore(rollout.config, variants, controller=LocalController(rollout))
    core.secret = bytes.fromhex(rollout.snapshot(0).secret)
    return core


def client(core: RouterCore) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(lambda: core)), base_url="http://router")


async def test_a_repeated_vote_is_refused_on_whichever_replica_it_lands(tmp_path: Path) -> None:
    rollout = Rollout(config(tmp_path), Clock())
    first, second = replica(rollout), replica(rollout)
    async with client(first) as one, client(second) as two:
        answered = await one.post("/v1/chat/completions", json=CHAT, headers=PREMIUM)
        vote = {"response_id": answered.json()["id"], "overridden": True}
        assert (await two.post("/v1/feedback", json=vote, headers=PREMIUM)).status_code == 200
        for http in (one, two):
            again = await http.post("/v1/feedback", json=vote, headers=PREMIUM)
            assert (again.status_code, again.json()["error"]["code"]) == (409, "duplicate")
    labels = {"variant": "fp16", "tier": "premium", "kind": "feedback"}
    counted = [metric_sample(core.metrics, "ray_serving_overrides_total", labels) for core in (first, second)]
    assert counted == [None, 1]  # counted once, by the replica that took it
    feedback = [s for core in (first, second) for s in core.follower.signals if isinstance(s, FeedbackSignal)]
    assert feedback == [FeedbackSignal("premium", "fp16", True, vote["response_id"])]


async def test_a_controller_that_does_not_answer_leaves_the_vote_to_the_replica(tmp_path: Path) -> None:
    core = replica(Rollout(config(tmp_path), Clock()))

    class Unreachable(LocalController):
        async def take_vote(self, response_id: str) -> bool:
            raise ConnectionError("controller gone")

    core.follower.controller = Unreachable(None)
    async with client(core) as http:
        answered = await http.post("/v1/chat/completions", json=CHAT, headers=PREMIUM)
        vote = {"response_id": answered.json()["id"], "overridden": False}
        assert (await http.post("/v1/feedback", json=vote, headers=PREMIUM)).status_code == 200
        assert (await http.post("/v1/feedback", json=vote, headers=PREMIUM)).status_code == 409


def test_the_controller_forgets_votes_once_their_answers_are_too_old_for_feedback(tmp_path: Path) -> None:
    clock = Clock()
    rollout = Rollout(config(tmp_path), clock)
    assert rollout.take_vote("a") is True
    assert rollout.take_vote("a") is False
    clock.now += rollout.config.limits.feedback_max_age_s + 1
    assert rollout.take_vote("b") is True
    assert list(rollout.votes) == ["b"]  # "a" can no longer be voted on at all (its signed id expired)


def test_the_vote_memory_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from serving.rollout import controller

    monkeypatch.setattr(controller, "MAX_VOTES", 3)
    rollout = Rollout(config(tmp_path), Clock())
    for i in range(10):
        assert rollout.take_vote(f"id-{i}")
    assert list(rollout.votes) == ["id-7", "id-8", "id-9"]


class Flaky(LocalController):
    """A link whose reports fail `failures` times after the controller took them (the acknowledgement lost)."""

    def __init__(self, rollout: Rollout, failures: int) -> None:
        super().__init__(rollout)
        self.failures = failures
        self.sent: list[str] = []

    async def report(self, batch: str, signals: list[Signal]) -> None:
        self.sent.append(batch)
        await super().report(batch, signals)
        if self.failures:
            self.failures -= 1
            raise ConnectionError("the answer was lost")


async def test_signals_are_kept_until_acknowledged_and_judged_once(tmp_path: Path) -> None:
    rollout = Rollout(config(tmp_path), Clock())
    link = Flaky(rollout, failures=2)
    follower = Follower(link)
    for i in range(3):
        follower.record(RequestSignal("batch", "awq", True, 0.1, 0.01, 0.001 * i))
    for _ in range(2):
        with pytest.raises(ConnectionError):
            await follower.deliver()
        assert follower.unacknowledged is not None  # kept, to be sent again
    follower.record(RequestSignal("batch", "awq", False, 0.1, None, None))  # a new one waits its turn
    assert await follower.deliver() == 4
    first, again, third, fourth = link.sent
    assert first == again == third != fourth  # the same batch id until acknowledged
    window = rollout.window("batch", rollout.config.tiers["batch"], 0.0)
    assert (window.candidate_requests, window.candidate_errors) == (4, 1)  # each signal judged once


async def test_a_replica_takes_the_controllers_weights_and_starts_at_zero(tmp_path: Path) -> None:
    rollout = Rollout(config(tmp_path), Clock())
    core = replica(rollout)
    assert core.follower.weight(core.config, "batch") == 0.0  # until the controller answered
    snapshot = await core.follower.sync(0)
    core.follower.follow(snapshot.weights)
    assert core.follower.weight(core.config, "batch") == rollout.weights()["batch"] > 0


def test_a_restarted_controller_resumes_judging_the_saved_window(tmp_path: Path) -> None:
    clock = Clock()
    first = Rollout(config(tmp_path), clock)
    first.report([ComparisonSignal("batch", "awq", "fp16", "candidate", True, 0.3) for _ in range(20)], "r1-1")
    assert first.save_window() is False  # throttled: not due yet
    clock.now += first.config.rollback.window_save_s
    assert first.save_window() is True
    first.report([ComparisonSignal("batch", "awq", "fp16", "candidate", True, 0.3) for _ in range(5)], "r1-2")
    # The controller dies here: the last 5 were taken after the save and are lost with it.
    again = Rollout(config(tmp_path), clock, restarted=True)
    tier = again.config.tiers["batch"]
    assert len(again.window("batch", tier, 0.0).drifts) == 20
    again.report([ComparisonSignal("batch", "awq", "fp16", "candidate", True, 0.3) for _ in range(20)], "r1-1")
    assert len(again.window("batch", tier, 0.0).drifts) == 20  # a batch sent again is not counted twice
    again.report([ComparisonSignal("batch", "awq", "fp16", "candidate", True, 0.3) for _ in range(10)], "r1-3")
    assert again.evaluate() == ["batch"]  # judged on the resumed window plus the new signals


def test_saved_signals_older_than_the_window_or_a_damaged_file_give_a_fresh_window(tmp_path: Path) -> None:
    clock = Clock()
    first = Rollout(config(tmp_path), clock)
    first.report([RequestSignal("batch", "awq", True, 0.1, 0.01, 0.001)])
    first.save_window(force=True)
    clock.now += first.config.rollback.window_s + 1
    assert list(Rollout(config(tmp_path), clock, restarted=True).events) == []
    window_file = tmp_path / "state.json.window"
    window_file.write_text("{not json")
    assert list(Rollout(config(tmp_path), Clock(), restarted=True).events) == []


async def test_the_rollout_status_of_a_controller_that_does_not_answer_is_a_503(tmp_path: Path) -> None:
    core = replica(Rollout(config(tmp_path), Clock()))

    class Down(LocalController):
        async def status(self) -> dict[str, object]:
            raise ConnectionError("restarting")

    core.follower.controller = Down(None)
    async with client(core) as http:
        answer = await http.get("/admin/rollout", headers={"authorization": "Bearer demo-admin"})
    assert (answer.status_code, answer.json()["error"]["code"]) == (503, "no_controller")
