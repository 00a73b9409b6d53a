"""Escalation to full precision over fake variants: which answers are re-run, what the client gets, what is
counted; and the configs that are refused."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from serving.config import Config, ConfigError, EscalationConfig, config_from_data, load_config
from serving.metrics import sample
from serving.route.core import RouterCore, create_app
from serving.variants.client import FakeVariant

REPO = Path(__file__).resolve().parents[2]
CHAT = {"model": "demo-chat", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
COMPLETION = {"model": "demo-chat", "prompt": "We the", "max_tokens": 4}
STANDARD = {"authorization": "Bearer demo-standard"}
THRESHOLD = -2.0


def demo(escalation: EscalationConfig | None, weight: float = 100.0) -> Config:
    """The demo config with every standard user on int8 (weight 100) and the given escalation policy."""
    config = load_config(REPO / "deploy" / "demo.yaml")
    standard = config.tiers["standard"].model_copy(update={"weight": weight, "shadow": None, "escalation": escalation})
    return config.model_copy(update={"tiers": {**config.tiers, "standard": standard}})


def fakes(int8_logprob: float) -> dict[str, FakeVariant]:
    return {
        "fp16": FakeVariant("fp16", answer_logprob=-0.1),
        "int8": FakeVariant("int8", answer_logprob=int8_logprob),
        "awq": FakeVariant("awq"),
    }


async def client_for(core: RouterCore) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(lambda: core))
    async with httpx.AsyncClient(transport=transport, base_url="http://router") as http:
        yield http


@pytest.fixture
def low() -> RouterCore:
    """int8 answers with mean log-prob -3, below the threshold -2."""
    return RouterCore(demo(EscalationConfig(min_mean_logprob=THRESHOLD)), fakes(-3.0))


@pytest.fixture
async def client(low: RouterCore) -> AsyncIterator[httpx.AsyncClient]:
    async for http in client_for(low):
        yield http


def fake(core: RouterCore, name: str) -> FakeVariant:
    variant = core.variants[name]
    assert isinstance(variant, FakeVariant)
    return variant


def escalations(core: RouterCore, variant: str = "int8") -> float | None:
    labels = {"variant": variant, "tier": "standard", "kind": "escalation"}
    return sample(core.metrics, "ray_serving_overrides_total", labels)


async def test_a_low_confidence_answer_is_replaced_by_full_precision(
    client: httpx.AsyncClient, low: RouterCore
) -> None:
    answer = await client.post("/v1/chat/completions", json=CHAT, headers=STANDARD)
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-served-variant"] == "fp16"
    assert answer.headers["x-escalated"] == "true"
    assert answer.headers["x-escalated-from"] == "int8"
    assert answer.json()["choices"][0]["message"]["content"] == "answer from fp16"
    assert "logprobs" not in answer.json()["choices"][0]  # asked for by the router, not the client
    int8, fp16 = fake(low, "int8"), fake(low, "fp16")
    assert int8.requests[0].logprobs is True  # the quantized call reported its tokens' log-probs
    assert fp16.requests[0].logprobs is False  # the re-run is the client's own request
    assert fp16.requests[0].request_id != int8.requests[0].request_id  # signed for the variant that answered
    assert escalations(low) == 1
    # The quantized call is a primary answer as usual; the re-run's duration is the added latency.
    requests = "ray_serving_requests_total"
    assert sample(low.metrics, requests, {"variant": "int8", "tier": "standard", "role": "primary", "outcome": "ok"})
    assert (
        sample(low.metrics, requests, {"variant": "fp16", "tier": "standard", "role": "escalation", "outcome": "ok"})
        == 1
    )
    added = {"variant": "fp16", "tier": "standard", "role": "escalation"}
    assert sample(low.metrics, "ray_serving_request_duration_seconds_count", added) == 1


async def test_completions_ask_for_one_logprob_and_escalate(client: httpx.AsyncClient, low: RouterCore) -> None:
    answer = await client.post("/v1/completions", json=COMPLETION, headers=STANDARD)
    assert answer.status_code == 200, answer.text
    assert (answer.headers["x-served-variant"], answer.headers["x-escalated"]) == ("fp16", "true")
    assert answer.json()["choices"][0]["text"] == "answer from fp16"
    assert fake(low, "int8").requests[0].logprobs == 1


async def test_a_confident_answer_stands_without_the_routers_logprobs() -> None:
    core = RouterCore(demo(EscalationConfig(min_mean_logprob=THRESHOLD)), fakes(-1.0))
    async for http in client_for(core):
        answer = await http.post("/v1/chat/completions", json=CHAT, headers=STANDARD)
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-served-variant"] == "int8"
        assert "x-escalated" not in answer.headers
        assert "logprobs" not in answer.json()["choices"][0]
        completion = await http.post("/v1/completions", json=COMPLETION, headers=STANDARD)
        assert "logprobs" not in completion.json()["choices"][0]
    assert fake(core, "fp16").requests == []
    assert escalations(core) is None


async def test_logprobs_the_client_asked_for_are_kept(client: httpx.AsyncClient, low: RouterCore) -> None:
    kept = await client.post("/v1/chat/completions", json={**CHAT, "logprobs": True}, headers=STANDARD)
    assert kept.headers["x-escalated"] == "true"
    assert kept.json()["choices"][0]["logprobs"]["content"][0]["logprob"] == -0.1  # the fp16 answer's own
    assert fake(low, "fp16").requests[0].logprobs is True
    completion = await client.post("/v1/completions", json={**COMPLETION, "logprobs": 2}, headers=STANDARD)
    assert completion.json()["choices"][0]["logprobs"]["token_logprobs"] == [-0.1, -0.1, -0.1]


async def test_streamed_answers_are_never_escalated(client: httpx.AsyncClient, low: RouterCore) -> None:
    answer = await client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=STANDARD)
    assert answer.status_code == 200
    assert answer.headers["x-served-variant"] == "int8"
    assert "x-escalated" not in answer.headers
    events = [json.loads(e.removeprefix("data: ")) for e in answer.text.split("\n\n") if e and "[DONE]" not in e]
    assert "".join(e["choices"][0]["delta"]["content"] for e in events).strip() == "answer from int8"
    assert not fake(low, "int8").requests[0].logprobs
    assert escalations(low) is None


async def test_full_precision_and_pinned_answers_are_not_escalated(low: RouterCore) -> None:
    low.apply(demo(EscalationConfig(min_mean_logprob=0.0), weight=0.0))  # every standard user on fp16
    low.variants["fp16"] = FakeVariant("fp16", answer_logprob=-5.0)
    async for http in client_for(low):
        answer = await http.post("/v1/chat/completions", json=CHAT, headers=STANDARD)
        assert (answer.headers["x-served-variant"], answer.headers.get("x-escalated")) == ("fp16", None)
        pinned = await http.post(
            "/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer demo-admin", "x-variant": "int8"}
        )
        assert (pinned.headers["x-served-variant"], pinned.headers.get("x-escalated")) == ("int8", None)
    assert escalations(low) is None


async def test_a_failed_rerun_leaves_the_quantized_answer(low: RouterCore) -> None:
    low.variants["fp16"] = FakeVariant("fp16", fail=RuntimeError("replica died"))
    async for http in client_for(low):
        answer = await http.post("/v1/chat/completions", json=CHAT, headers=STANDARD)
        assert answer.status_code == 200, answer.text
        assert (answer.headers["x-served-variant"], answer.headers.get("x-escalated")) == ("int8", None)
        assert "logprobs" not in answer.json()["choices"][0]
    assert escalations(low) is None


def test_escalation_needs_a_full_precision_baseline_and_a_quantized_candidate() -> None:
    raw = load_config(REPO / "deploy" / "demo.yaml").model_dump(mode="json", exclude_none=True)
    raw["tiers"]["batch"]["escalation"] = {"min_mean_logprob": -1.0}  # batch: int8 baseline
    raw["tiers"]["premium"]["escalation"] = {"min_mean_logprob": -1.0}  # premium: fp16 only
    with pytest.raises(ConfigError) as refused:
        config_from_data(raw, base_dir=REPO / "deploy")
    message = str(refused.value)
    assert "tiers.batch.escalation: the baseline 'int8' is int8" in message
    assert "full precision" in message
    assert "tiers.premium.escalation: the tier has no quantized candidate" in message
    raw["tiers"]["standard"]["escalation"] = {"min_mean_logprob": 0.5}  # a log-prob is never above 0
    with pytest.raises(ConfigError, match=r"tiers\.standard\.escalation\.min_mean_logprob"):
        config_from_data(raw, base_dir=REPO / "deploy")
    raw["tiers"]["standard"]["escalation"] = {"min_mean_logprob": -1.0}
    del raw["tiers"]["batch"]["escalation"], raw["tiers"]["premium"]["escalation"]
    config = config_from_data(raw, base_dir=REPO / "deploy")
    assert config.tiers["standard"].escalation == EscalationConfig(min_mean_logprob=-1.0)
