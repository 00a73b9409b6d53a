"""Feedback on any router replica: response ids carry a signed attribution, so no shared store is needed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from serving.config import load_config
from serving.errors import BadRequest, NotFound
from serving.metrics import sample as metric_sample
from serving.rollout.controller import Rollout
from serving.rollout.signals import FeedbackSignal, RequestSignal, Signal
from serving.route import attribution
from serving.route.core import RouterCore, create_app
from serving.variants.client import FakeVariant
from tests.clock import Clock
from tests.unit.test_rollout import demo_config

REPO = Path(__file__).resolve().parents[2]
BATCH = {"authorization": "Bearer demo-batch"}
CHAT = {"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
KEY = attribution.key_from(b"s" * 32)


def test_an_id_says_who_answered_and_when() -> None:
    request_id = attribution.sign(KEY, "acme", "batch", "awq", at=1000.0)
    found = attribution.verify([KEY], f"chatcmpl-{request_id}", max_age_s=60, now=1010.0)
    assert found == attribution.Attribution("acme", "batch", "awq", 1000.0)
    assert attribution.verify([KEY], f"cmpl-{request_id}", max_age_s=60, now=1010.0).variant == "awq"


def test_a_changed_id_is_refused() -> None:
    payload, signature = attribution.sign(KEY, "acme", "batch", "awq").split(".")
    forged = attribution.b64(attribution.unb64(payload).replace(b"awq", b"int"))  # claims another variant
    # One signature character changed, in the middle: the last one also carries unused padding bits, and
    # some changes there decode to the same bytes.
    middle = len(signature) // 2
    tampered = signature[:middle] + ("A" if signature[middle] != "A" else "B") + signature[middle + 1 :]
    for changed in (f"{forged}.{signature}", f"{payload}.{tampered}", payload, "nope", ""):
        with pytest.raises(BadRequest, match="not the id of a response"):
            attribution.verify([KEY], f"chatcmpl-{changed}", max_age_s=60)
    with pytest.raises(BadRequest):  # another server's key
        attribution.verify([attribution.key_from(b"t" * 32)], attribution.sign(KEY, "a", "b", "c"), max_age_s=60)


def test_an_old_id_is_refused() -> None:
    request_id = attribution.sign(KEY, "acme", "batch", "awq", at=1000.0)
    with pytest.raises(NotFound, match="older than 60 s"):
        attribution.verify([KEY], request_id, max_age_s=60, now=1061.0)


def replica(secret: bytes) -> RouterCore:
    config = load_config(REPO / "deploy" / "demo.yaml")
    core = RouterCore(config, {name: FakeVariant(name) for name in config.variants})
    core.secret = secret  # as the controller hands it to every replica
    return core


@asynccontextmanager
async def http(core: RouterCore) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(lambda: core))
    async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
        yield client


async def test_feedback_posted_to_another_replica_counts_for_the_variant_that_answered() -> None:
    one, two = replica(b"shared" * 6), replica(b"shared" * 6)
    async with http(one) as first, http(two) as second:
        answers = [
            await first.post("/v1/chat/completions", json={**CHAT, "user": f"u{i}"}, headers=BATCH) for i in range(8)
        ]
        served = {a.json()["id"]: a.headers["x-served-variant"] for a in answers}
        assert set(served.values()) == {"int8", "awq"}  # the batch tier's canary split
        for response_id, variant in served.items():
            vote = await second.post(
                "/v1/feedback", json={"response_id": response_id, "overridden": True}, headers=BATCH
            )
            assert (vote.status_code, vote.json()["variant"]) == (200, variant)
    counted = {
        v: metric_sample(
            two.metrics, "ray_serving_overrides_total", {"variant": v, "tier": "batch", "kind": "feedback"}
        )
        for v in ("int8", "awq")
    }
    assert counted == {v: list(served.values()).count(v) for v in ("int8", "awq")}


async def test_a_replica_with_another_secret_refuses_the_id() -> None:
    async with http(replica(b"a" * 32)) as first, http(replica(b"b" * 32)) as other:
        response_id = (await first.post("/v1/chat/completions", json=CHAT, headers=BATCH)).json()["id"]
        vote = await other.post("/v1/feedback", json={"response_id": response_id, "overridden": True}, headers=BATCH)
        assert (vote.status_code, vote.json()["error"]["code"]) == (400, "bad_id")


async def test_ids_signed_before_the_controller_secret_arrived_still_verify() -> None:
    core = replica(b"x" * 32)
    core.secret = None
    async with http(core) as client:
        response_id = (await client.post("/v1/chat/completions", json=CHAT, headers=BATCH)).json()["id"]
        core.secret = b"x" * 32
        vote = await client.post("/v1/feedback", json={"response_id": response_id, "overridden": False}, headers=BATCH)
        assert vote.status_code == 200


def test_the_controller_counts_one_vote_per_response_whichever_replicas_took_it(tmp_path: Path) -> None:
    rollout = Rollout(demo_config(tmp_path), Clock())
    tier = rollout.config.tiers["batch"]
    requests: list[Signal] = [RequestSignal("batch", "awq", True, 0.1, None, 0.01)] * 10
    same_vote_at_two_replicas = [FeedbackSignal("batch", "awq", True, "chatcmpl-1")] * 2
    rollout.report(requests + same_vote_at_two_replicas + [FeedbackSignal("batch", "awq", True, "chatcmpl-2")])
    assert rollout.window("batch", tier, 0.0).candidate_overrides == 2
