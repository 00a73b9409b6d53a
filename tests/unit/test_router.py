"""The router's HTTP surface over fake variants: no Ray, no engine."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from serving.config import load_config
from serving.metrics import sample as metric_sample
from serving.route.core import RouterCore, create_app
from serving.variants.client import FakeVariant

REPO = Path(__file__).resolve().parents[2]
CHAT = {"model": "demo-chat", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}


@pytest.fixture
def core() -> RouterCore:
    config = load_config(REPO / "deploy" / "demo.yaml")
    return RouterCore(config, {name: FakeVariant(name) for name in config.variants}, {"fp16": {"weights": "x"}})


@pytest.fixture
async def client(core: RouterCore) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(lambda: core))
    async with httpx.AsyncClient(transport=transport, base_url="http://router") as http:
        yield http


def key(name: str, **extra: str) -> dict[str, str]:
    return {"authorization": f"Bearer {name}", **extra}


async def test_chat_is_answered_by_the_tier_baseline_and_says_so(client: httpx.AsyncClient) -> None:
    answer = await client.post("/v1/chat/completions", json=CHAT, headers=key("demo-premium"))
    assert answer.status_code == 200
    assert answer.headers["x-served-variant"] == "fp16"
    assert answer.json()["model"] == "demo-chat"
    assert answer.json()["choices"][0]["message"]["content"] == "answer from fp16"


async def test_completions_and_streaming(client: httpx.AsyncClient) -> None:
    body = {"model": "demo-chat", "prompt": "We the", "max_tokens": 3, "stream": True}
    answer = await client.post("/v1/completions", json=body, headers=key("demo-premium"))
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/event-stream")
    events = [line for line in answer.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    texts = [json.loads(e.removeprefix("data: "))["choices"][0]["text"] for e in events[:-1]]
    assert "".join(texts).strip() == "answer from fp16"


async def test_sticky_user_field_decides_the_variant(client: httpx.AsyncClient) -> None:
    seen = set()
    for _ in range(5):
        answer = await client.post("/v1/chat/completions", json={**CHAT, "user": "alice"}, headers=key("demo-batch"))
        seen.add(answer.headers["x-served-variant"])
    assert len(seen) == 1
    assert seen <= {"int8", "awq"}


async def test_override_needs_permission_and_is_counted(client: httpx.AsyncClient, core: RouterCore) -> None:
    denied = await client.post("/v1/chat/completions", json=CHAT, headers=key("demo-batch", **{"x-variant": "fp16"}))
    assert denied.status_code == 403
    assert denied.json()["error"]["code"] == "override_denied"
    pinned = await client.post("/v1/chat/completions", json=CHAT, headers=key("demo-admin", **{"x-variant": "awq"}))
    assert pinned.status_code == 200
    assert pinned.headers["x-served-variant"] == "awq"
    overrides = metric_sample(
        core.metrics, "ray_serving_overrides_total", {"variant": "awq", "tier": "standard", "kind": "routing"}
    )
    assert overrides == 1


@pytest.mark.parametrize(
    ("headers", "body", "status", "code"),
    [
        ({}, CHAT, 401, "missing_api_key"),
        (key("wrong"), CHAT, 401, "invalid_api_key"),
        (key("demo-batch"), b"{not json", 400, "invalid_json"),
        (key("demo-batch"), b"[1, 2]", 400, "invalid_json"),
        (key("demo-batch"), {**CHAT, "model": "gpt-4"}, 404, "model_not_found"),
        (key("demo-batch"), {**CHAT, "temperature": "hot"}, 400, "invalid_parameter"),
        (key("demo-batch"), {"model": "demo-chat"}, 400, "invalid_parameter"),
        (key("demo-batch"), {**CHAT, "n": 99}, 400, "n_too_large"),
        (key("demo-batch"), {**CHAT, "max_tokens": 100_000}, 400, "max_tokens"),
        (key("demo-batch"), {**CHAT, "messages": [{"role": "user", "content": "x" * 40_000}]}, 400, "prompt_too_long"),
        (
            key("demo-batch"),
            {**CHAT, "messages": [{"role": "user", "content": "x" * 2_000_000}]},
            413,
            "body_too_large",
        ),
        (key("demo-admin", **{"x-variant": "fp8"}), CHAT, 404, "variant_not_found"),
    ],
)
async def test_bad_input_gets_an_openai_error_with_the_right_status(
    client: httpx.AsyncClient, headers: dict[str, str], body: object, status: int, code: str
) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    answer = await client.post(
        "/v1/chat/completions", content=content, headers={"content-type": "application/json", **headers}
    )
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert "Traceback" not in answer.text


async def test_engine_rejections_and_failures_are_mapped(client: httpx.AsyncClient, core: RouterCore) -> None:
    core.variants["fp16"] = FakeVariant("fp16", error_status=400)
    rejected = await client.post("/v1/chat/completions", json=CHAT, headers=key("demo-premium"))
    assert (rejected.status_code, rejected.json()["error"]["code"]) == (400, "engine_rejected")
    core.variants["fp16"] = FakeVariant("fp16", fail=RuntimeError("replica died at /secret/path"))
    failed = await client.post("/v1/chat/completions", json=CHAT, headers=key("demo-premium"))
    assert failed.status_code == 503
    assert "/secret/path" not in failed.text
    ready = await client.get("/ready")
    assert ready.status_code == 503
    assert ready.json()["variants"]["fp16"] is False


@pytest.mark.parametrize(("engine_status", "outcome", "status"), [(400, "rejected", 400), (500, "error", 503)])
async def test_an_engine_refusal_is_rejected_and_an_engine_failure_an_error(
    client: httpx.AsyncClient, core: RouterCore, engine_status: int, outcome: str, status: int
) -> None:
    # A refused request says nothing of the variant's health; a failed engine does (error rate, rollback).
    core.variants["fp16"] = FakeVariant("fp16", error_status=engine_status)
    answer = await client.post("/v1/chat/completions", json=CHAT, headers=key("demo-premium"))
    assert answer.status_code == status
    labels = {"variant": "fp16", "tier": "premium", "role": "primary"}
    assert metric_sample(core.metrics, "ray_serving_requests_total", {**labels, "outcome": outcome}) == 1
    other = "error" if outcome == "rejected" else "rejected"
    assert not metric_sample(core.metrics, "ray_serving_requests_total", {**labels, "outcome": other})


async def test_models_lists_one_model_with_its_variants(client: httpx.AsyncClient) -> None:
    assert (await client.get("/v1/models")).status_code == 401
    listing = (await client.get("/v1/models", headers=key("demo-premium"))).json()
    assert [m["id"] for m in listing["data"]] == ["demo-chat"]
    assert listing["data"][0]["variants"]["awq"]["precision"] == "awq"
    assert listing["data"][0]["variants"]["fp16"]["provenance"] == {"weights": "x"}
    # what each engine reports of itself: the activation dtype chosen for its hardware, and why
    assert listing["data"][0]["variants"]["int8"]["dtype"] == "float16"
    assert listing["data"][0]["variants"]["int8"]["dtype_reason"] == "a fake"
    assert listing["data"][0]["variants"]["int8"]["linear_kernels"] == ["FakeLinear"]


async def test_models_still_lists_a_variant_whose_engine_does_not_answer(
    client: httpx.AsyncClient, core: RouterCore
) -> None:
    core.variants["awq"] = FakeVariant("awq")
    core.variants["awq"].describe = broken  # type: ignore[method-assign]
    listing = (await client.get("/v1/models", headers=key("demo-premium"))).json()
    awq = listing["data"][0]["variants"]["awq"]
    assert (awq["precision"], awq["dtype"]) == ("awq", None)
    assert core.engine_facts.keys() == {"fp16", "int8"}  # awq is asked again next time


async def broken() -> dict[str, str]:
    raise RuntimeError("replica starting")


async def test_applying_a_config_changes_routing_in_place(core: RouterCore, client: httpx.AsyncClient) -> None:
    tiers = dict(core.config.tiers)
    tiers["batch"] = tiers["batch"].model_copy(update={"weight": 100.0})
    core.apply(core.config.model_copy(update={"tiers": tiers}))
    served = {
        (await client.post("/v1/chat/completions", json={**CHAT, "user": f"u{i}"}, headers=key("demo-batch"))).headers[
            "x-served-variant"
        ]
        for i in range(20)
    }
    assert served == {"awq"}
    with pytest.raises(ValueError, match="needs a redeploy"):
        core.apply(core.config.model_copy(update={"variants": {}}))


async def test_the_router_follows_the_controller_weights(client: httpx.AsyncClient, core: RouterCore) -> None:
    core.follower.follow({"premium": 0.0, "standard": 50.0, "batch": 0.0})
    served = {
        (await client.post("/v1/chat/completions", json={**CHAT, "user": f"u{i}"}, headers=key("demo-batch"))).headers[
            "x-served-variant"
        ]
        for i in range(20)
    }
    assert served == {"int8"}  # the config says 50 % awq; the controller's live weight 0 wins
    # The controller's weights, rollbacks and phases are its own metrics (emitted once), never a router's.
    for name, labels in (
        ("ray_serving_rollbacks_total", {"tier": "batch", "reason": "score_drift"}),
        ("ray_serving_canary_weight_percent", {"tier": "batch", "candidate": "awq"}),
    ):
        assert metric_sample(core.metrics, name, labels) is None


async def test_admin_rollout_needs_an_admin_key(client: httpx.AsyncClient, core: RouterCore) -> None:
    assert (await client.get("/admin/rollout", headers=key("demo-batch"))).status_code == 403

    class Controller:
        async def status(self) -> dict[str, object]:
            return {"tiers": {}}

    core.follower.controller = Controller()  # type: ignore[assignment]
    answer = await client.get("/admin/rollout", headers=key("demo-admin"))
    assert answer.status_code == 200
    assert set(answer.json()) == {"tiers", "router"}
