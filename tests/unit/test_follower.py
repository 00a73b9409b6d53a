"""The router side of the rollout: several router replicas in front of one controller (a `Rollout`
in memory, no Ray), as in production."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from serving.config import Config, load_config
from serving.metrics import sample as metric_sample
from serving.rollout.controller import Rollout
from serving.rollout.signals import FeedbackSignal
from serving.router import RouterCore, create_app
from serving.variants import FakeVariant

REPO = Path(__file__).resolve().parents[2]
CHAT = {"model": "demo-chat", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
PREMIUM = {"authorization": "Bearer demo-premium"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def config(tmp_path: Path) -> Config:
    loaded = load_config(REPO / "deploy" / "demo.yaml")
    rollback = loaded.rollback.model_copy(update={"state_file": tmp_path / "state.json"})
    return loaded.model_copy(update={"rollback": rollback})


def replica(rollout: Rollout) -> RouterCore:
    """One router replica attached to the shared controller, as serving.app attaches it."""
    core = RouterCore(rollout.config, {name: FakeVariant(name) for name in rollout.config.variants})
    core.secret = bytes.fromhex(rollout.snapshot(0)["secret"])

    async def take_vote(response_id: str) -> bool:
        return rollout.take_vote(response_id)

    core.vote_keeper = take_vote
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
    feedback = [s for core in (first, second) for s in core.signals if isinstance(s, FeedbackSignal)]
    assert feedback == [FeedbackSignal("premium", "fp16", True, vote["response_id"])]


async def test_a_controller_that_does_not_answer_leaves_the_vote_to_the_replica(tmp_path: Path) -> None:
    core = replica(Rollout(config(tmp_path), Clock()))

    async def unreachable(response_id: str) -> bool:
        raise ConnectionError("controller gone")

    core.vote_keeper = unreachable
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
