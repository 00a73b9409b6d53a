"""A candidate that is down: its tier's requests are answered by the baseline (counted as overrides of kind
"fallback"), never by a precision the tier forbids; a baseline that is down is a clear 503."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from ray.serve.exceptions import BackPressureError

from serving.config import load_config
from serving.metrics import sample as metric_sample
from serving.route.core import RouterCore, create_app
from serving.variants.client import FakeVariant

REPO = Path(__file__).resolve().parents[2]
CHAT = {"model": "demo-chat", "messages": [{"role": "user", "content": "hello"}]}
STANDARD = {"authorization": "Bearer demo-standard"}
FALLBACK = {"variant": "int8", "tier": "standard", "kind": "fallback"}


def make_core(**standard: object) -> RouterCore:
    """The demo config with every standard user on its candidate (int8; baseline fp16)."""
    config = load_config(REPO / "deploy" / "demo.yaml")
    tiers = dict(config.tiers)
    tiers["standard"] = tiers["standard"].model_copy(update={"weight": 100.0, **standard})
    return RouterCore(config.model_copy(update={"tiers": tiers}), {n: FakeVariant(n) for n in config.variants})


def client_of(core: RouterCore) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(lambda: core)), base_url="http://router")


def fallbacks(core: RouterCore) -> float:
    return metric_sample(core.metrics, "ray_serving_overrides_total", FALLBACK) or 0.0


def outcome(core: RouterCore, variant: str, tier: str, result: str) -> float:
    labels = {"variant": variant, "tier": tier, "role": "primary", "outcome": result}
    return metric_sample(core.metrics, "ray_serving_requests_total", labels) or 0.0


@pytest.mark.parametrize(
    "down",
    [
        FakeVariant("int8", fail=RuntimeError("replica died")),  # the call raised: variant_unavailable
        FakeVariant("int8", error_status=500),  # the engine answered with a failure: engine_error
    ],
)
async def test_a_down_candidate_is_answered_by_the_baseline_and_counted(down: FakeVariant) -> None:
    core = make_core()
    core.variants["int8"] = down
    async with client_of(core) as http:
        answer = await http.post("/v1/chat/completions", json=CHAT, headers=STANDARD)
    assert answer.status_code == 200
    assert answer.headers["x-served-variant"] == "fp16"
    assert answer.headers["x-fallback-from"] == "int8"
    assert answer.json()["choices"][0]["message"]["content"] == "answer from fp16"
    assert fallbacks(core) == 1
    assert outcome(core, "int8", "standard", "error") == 1  # the candidate's failure still counts against it
    assert outcome(core, "fp16", "standard", "ok") == 1
    assert answer.json()["id"].startswith("chatcmpl-")  # feedback on it goes to fp16, which wrote it


async def test_while_held_down_the_candidate_is_passed_over_then_tried_again() -> None:
    core = make_core()
    broken = FakeVariant("int8", fail=RuntimeError("replica died"))
    core.variants["int8"] = broken
    async with client_of(core) as http:
        for _ in range(3):
            answer = await http.post("/v1/chat/completions", json=CHAT, headers=STANDARD)
            assert answer.headers["x-served-variant"] == "fp16"
        assert len(broken.requests) == 1  # only the first waited on it; the others went straight to fp16
        assert fallbacks(core) == 3
        core.variants["int8"] = FakeVariant("int8")  # the replica is back
        core.down_until["int8"] = 0.0  # and the hold (CANDIDATE_DOWN_HOLD_S) is over
        answer = await http.post("/v1/chat/completions", json=CHAT, headers=STANDARD)
    assert answer.headers["x-served-variant"] == "int8"
    assert "x-fallback-from" not in answer.headers
    assert fallbacks(core) == 3


async def test_a_streamed_request_falls_back_before_any_byte_is_sent() -> None:
    core = make_core()
    core.variants["int8"] = FakeVariant("int8", fail=RuntimeError("replica died"))
    async with client_of(core) as http:
        answer = await http.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=STANDARD)
    assert answer.status_code == 200
    assert answer.headers["x-served-variant"] == "fp16"
    chunks = [json.loads(line[6:]) for line in answer.text.splitlines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]).strip() == (
        "answer from fp16"
    )
    assert answer.text.rstrip().endswith("data: [DONE]")


async def test_a_stream_cut_after_its_first_byte_is_not_replayed_on_the_baseline() -> None:
    core = make_core()
    core.variants["int8"] = FakeVariant("int8", fail_midstream=RuntimeError("replica died"))
    async with client_of(core) as http:
        answer = await http.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=STANDARD)
    assert answer.headers["x-served-variant"] == "int8"
    assert "stream_interrupted" in answer.text  # the client saw int8's first words: a clear error, no mix
    assert fallbacks(core) == 0


async def test_a_down_baseline_is_a_clear_503_and_so_is_a_tier_with_both_down() -> None:
    core = make_core()
    core.variants["fp16"] = FakeVariant("fp16", fail=RuntimeError("replica died"))
    async with client_of(core) as http:
        premium = await http.post("/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer demo-premium"})
        core.variants["int8"] = FakeVariant("int8", fail=RuntimeError("replica died"))
        standard = await http.post("/v1/chat/completions", json=CHAT, headers=STANDARD)
    for answer in (premium, standard):
        assert answer.status_code == 503
        error = answer.json()["error"]
        assert error["code"] == "variant_unavailable"
        assert "fp16 is unavailable" in error["message"]
    assert fallbacks(core) == 1  # standard's try on fp16 was a fallback that failed too


async def test_no_fallback_for_a_full_queue_or_a_pinned_variant() -> None:
    core = make_core()
    core.variants["int8"] = FakeVariant("int8", fail=BackPressureError(num_queued_requests=8, max_queued_requests=8))
    async with client_of(core) as http:
        busy = await http.post("/v1/chat/completions", json=CHAT, headers=STANDARD)
        assert (busy.status_code, busy.json()["error"]["code"]) == (503, "engine_overloaded")  # not down: no fallback
        core.variants["int8"] = FakeVariant("int8", fail=RuntimeError("replica died"))
        pinned = await http.post(
            "/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer demo-admin", "x-variant": "int8"}
        )
    assert (pinned.status_code, pinned.json()["error"]["code"]) == (503, "variant_unavailable")
    assert pinned.headers["retry-after"] == "5"  # a new replica takes seconds: the client waits before retrying
    assert fallbacks(core) == 0
    assert not core.variants["fp16"].requests  # type: ignore[attr-defined]


async def test_never_a_fallback_onto_a_precision_the_tier_forbids() -> None:
    # The config refuses a tier whose baseline it forbids; the router holds to the list all the same.
    core = make_core(forbid=("fp16",))
    core.variants["int8"] = FakeVariant("int8", fail=RuntimeError("replica died"))
    async with client_of(core) as http:
        answer = await http.post("/v1/chat/completions", json=CHAT, headers=STANDARD)
    assert (answer.status_code, answer.json()["error"]["code"]) == (503, "variant_unavailable")
    assert answer.headers["retry-after"] == "5"
    assert not core.variants["fp16"].requests  # type: ignore[attr-defined]
    assert fallbacks(core) == 0
