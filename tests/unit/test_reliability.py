"""Overload, impatient clients and oversized requests against the real router code (fake engines): header
limits (431), lower bounds on counts (400), per-key rate limits (429 with Retry-After), a full engine queue
(503 with Retry-After), bounded queues in the deployments' options, and cancellation of an engine's work
when its client goes away."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.responses import StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError

from serving.config import ConfigError, LimitsConfig, load_config, parse_config
from serving.intake import limits
from serving.intake.admission import KeyQuotas, RateLimit, token_cost
from serving.intake.auth import authenticate
from serving.intake.protocol import parse_request, read_request
from serving.metrics import sample as metric_sample
from serving.rollout.signals import RequestSignal
from serving.route.core import RouterCore, create_app
from serving.variants.client import Endpoint, EngineItem, EngineRequest, FakeVariant, RayVariant
from tests.polling import poll_until_async

REPO = Path(__file__).resolve().parents[2]
PREMIUM = {"authorization": "Bearer demo-premium"}
CHAT = {"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"model": "demo-chat", "prompt": "We the", "max_tokens": 2}


def make_core(**limits: Any) -> RouterCore:
    config = load_config(REPO / "deploy" / "demo.yaml")
    config = config.model_copy(update={"limits": config.limits.model_copy(update=limits)})
    return RouterCore(config, {name: FakeVariant(name) for name in config.variants})


def client_of(core: RouterCore) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=create_app(lambda: core), raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://router")


def assert_openai_error(answer: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    error: dict[str, Any] = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code, error
    return error


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/models", "/health"])
async def test_too_many_headers_are_refused_with_431_on_every_endpoint(path: str) -> None:
    core = make_core()
    many = [(f"x-h{i}", "v") for i in range(500)] + list(PREMIUM.items())
    async with client_of(core) as http:
        answer = await (http.post(path, json=CHAT, headers=many) if "chat" in path else http.get(path, headers=many))
    assert "500 headers" not in assert_openai_error(answer, 431, "too_many_headers")["message"]  # 502 with ours
    assert not any(v.requests for v in core.variants.values())  # type: ignore[attr-defined]


async def test_headers_over_the_byte_limit_are_refused_with_431() -> None:
    async with client_of(make_core()) as http:
        answer = await http.post("/v1/chat/completions", json=CHAT, headers={**PREMIUM, "x-big": "a" * 20_000})
    assert_openai_error(answer, 431, "headers_too_large")


async def test_headers_within_the_limits_are_served() -> None:
    async with client_of(make_core()) as http:
        headers = {**PREMIUM, **{f"x-h{i}": "v" for i in range(50)}}
        answer = await http.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize(
    ("path", "field", "value"),
    [
        ("/v1/chat/completions", "max_tokens", -1),
        ("/v1/chat/completions", "max_tokens", 0),
        ("/v1/chat/completions", "max_completion_tokens", -5),
        ("/v1/completions", "max_tokens", -1),
        ("/v1/completions", "min_tokens", -1),
        ("/v1/chat/completions", "n", 0),
        ("/v1/chat/completions", "n", 1_000_000),
        ("/v1/completions", "n", -3),
        ("/v1/completions", "logprobs", -1),  # vLLM reads -1 as the whole vocabulary
        ("/v1/chat/completions", "prompt_logprobs", -1),
        ("/v1/chat/completions", "max_tokens", 10**12),
    ],
)
async def test_counts_out_of_range_either_way_are_400(path: str, field: str, value: int) -> None:
    core = make_core()
    base = CHAT if "chat" in path else COMPLETION
    async with client_of(core) as http:
        answer = await http.post(path, json={**base, field: value}, headers=PREMIUM)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == field
    assert not any(v.requests for v in core.variants.values())  # type: ignore[attr-defined]


async def test_requests_per_minute_per_key_give_429_with_retry_after_and_other_keys_go_on() -> None:
    core = make_core(requests_per_minute=2)
    async with client_of(core) as http:
        statuses = [(await http.post("/v1/chat/completions", json=CHAT, headers=PREMIUM)).status_code for _ in range(2)]
        refused = await http.post("/v1/chat/completions", json=CHAT, headers=PREMIUM)
        other = await http.post("/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer demo-batch"})
    assert statuses == [200, 200]
    assert_openai_error(refused, 429, "rate_limited")
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(refused.headers["retry-after"]) <= 30
    assert other.status_code == 200


async def test_tokens_per_minute_count_prompt_and_every_choice_and_a_refusal_costs_nothing() -> None:
    core = make_core(tokens_per_minute=1000, requests_per_minute=100)
    big = {**CHAT, "max_tokens": 400, "n": 2}  # ~810 tokens: one fits, the second does not
    async with client_of(core) as http:
        first = await http.post("/v1/chat/completions", json=big, headers=PREMIUM)
        second = await http.post("/v1/chat/completions", json=big, headers=PREMIUM)
        small = await http.post("/v1/chat/completions", json=CHAT, headers=PREMIUM)
    assert first.status_code == 200, first.text
    assert_openai_error(second, 429, "rate_limited")
    assert "tokens per minute" in second.json()["error"]["message"]
    assert small.status_code == 200  # the refused request took no tokens
    assert core.quotas.requests is not None
    assert core.quotas.requests.buckets[next(iter(core.quotas.requests.buckets))][0] == pytest.approx(98, abs=0.1)


def test_token_cost_counts_token_ids_exactly_and_text_by_estimate() -> None:
    ids = parse_request("completions", {**COMPLETION, "prompt": [1, 2, 3, 4, 5], "max_tokens": 10, "n": 3})
    assert token_cost("completions", ids) == 5 + 30
    text = parse_request("completions", {**COMPLETION, "prompt": "x" * 400, "max_tokens": 10})
    assert token_cost("completions", text) == 100 + 10


def test_the_prompt_is_measured_once_and_the_token_quota_reads_that_length() -> None:
    body = {**CHAT, "messages": [{"role": "user", "content": "\u00e9" * 400}], "max_tokens": 10}
    incoming = read_request("chat", body, LimitsConfig())
    assert incoming.prompt_chars == limits.prompt_chars("chat", body)
    assert 400 < incoming.prompt_chars < 450  # non-ASCII counts as characters, not as 6-character escapes
    assert token_cost("chat", incoming.request, incoming.prompt_chars) == math.ceil(incoming.prompt_chars / 4) + 10
    assert token_cost("chat", incoming.request, 4000) == 1000 + 10  # the length given is the one charged


def test_quotas_follow_a_config_apply_and_none_means_unlimited() -> None:
    now = [0.0]
    quotas = KeyQuotas(LimitsConfig(requests_per_minute=1, tokens_per_minute=None), clock=lambda: now[0])
    quotas.admit("k", 10**9)
    with pytest.raises(Exception, match="1 requests per minute"):
        quotas.admit("k", 1)
    quotas.configure(LimitsConfig(requests_per_minute=None, tokens_per_minute=None))
    for _ in range(100):
        quotas.admit("k", 10**9)


def test_a_request_larger_than_the_whole_bucket_waits_for_a_full_one_not_forever() -> None:
    now = [0.0]
    limit = RateLimit(60, clock=lambda: now[0])
    assert limit.take("k", 1000) == 0.0  # takes the whole bucket
    assert limit.take("k", 1000) == pytest.approx(60.0)
    now[0] = 60.0
    assert limit.take("k", 1000) == 0.0


async def test_a_full_engine_queue_is_a_fast_503_with_retry_after_not_counted_against_the_variant() -> None:
    core = make_core()
    core.variants["fp16"] = FakeVariant("fp16", fail=BackPressureError(num_queued_requests=8, max_queued_requests=8))
    async with client_of(core) as http:
        answer = await http.post("/v1/chat/completions", json=CHAT, headers=PREMIUM)
    error = assert_openai_error(answer, 503, "engine_overloaded")
    assert error["type"] == "service_unavailable"
    assert answer.headers["retry-after"] == "1"
    labels = {"variant": "fp16", "tier": "premium", "role": "primary", "outcome": "rejected"}
    assert metric_sample(core.metrics, "ray_serving_requests_total", labels) == 1
    assert metric_sample(core.metrics, "ray_serving_requests_total", {**labels, "outcome": "error"}) is None
    assert not any(isinstance(s, RequestSignal) for s in core.follower.signals)  # no rollback over a full queue
    assert core.loads["fp16"].now() == 0


def test_every_deployment_gets_bounded_queues_and_a_drain_timeout_that_ray_serve_accepts() -> None:
    config = load_config(REPO / "deploy" / "tiny.yaml")
    for options in [config.router.deployment_options(), *(v.deployment_options() for v in config.variants.values())]:
        assert options["max_queued_requests"] >= 1  # Ray's default, -1, is unbounded
        assert 1 <= options["max_ongoing_requests"] < 10**6  # Ray Serve LLM's default is a billion
        assert options["graceful_shutdown_timeout_s"] > 0
        serve.deployment(**options)(Dummy)  # raises on a field or value Ray Serve does not take
    with pytest.raises(ValueError, match="max_queued_requests"):
        serve.deployment(max_queued_requests=0)(Dummy)  # the check above can fail


class Dummy:
    pass


KEY = "{sha256: " + "a" * 64 + ", tenant: t, tier: t}"


def test_shadow_calls_cannot_take_more_than_half_an_engines_slots() -> None:
    text = f"""
model: m
variants:
  a: {{path: a, precision: fp16, max_ongoing_requests: 8}}
  b: {{path: b, precision: int8}}
tiers:
  t: {{baseline: a, shadow: {{target: b, rate: 0.5}}}}
keys: [{KEY}]
router: {{replicas: 2}}
shadowing: {{max_concurrency: 4}}
"""
    with pytest.raises(ConfigError, match=r"variants\.a\.max_ongoing_requests: 8 leaves no room") as refused:
        parse_config(text, base_dir=Path("/cfg"))
    assert "at least 16" in str(refused.value)
    parse_config(text.replace("max_ongoing_requests: 8", "max_ongoing_requests: 16"), base_dir=Path("/cfg"))


class Slow:
    """An engine that answers slowly, and records whether its generation was closed before the end."""

    def __init__(self, streamed: bool) -> None:
        self.streamed = streamed
        self.closed_early = asyncio.Event()
        self.started = asyncio.Event()

    async def call(self, endpoint: Endpoint, request: EngineRequest) -> AsyncIterator[EngineItem]:
        fake = FakeVariant("fp16")
        finished = False
        try:
            self.started.set()
            if not self.streamed:
                await asyncio.sleep(30)
            async for item in fake.call(endpoint, request):
                yield item
                await asyncio.sleep(30)
            finished = True
        finally:
            if not finished:
                self.closed_early.set()


async def test_a_client_gone_before_a_whole_answer_cancels_the_engine_call_and_frees_its_slot() -> None:
    core = make_core()
    slow = Slow(streamed=False)
    core.variants["fp16"] = slow  # type: ignore[assignment]
    async with client_of(core) as http:
        request = asyncio.create_task(http.post("/v1/chat/completions", json=CHAT, headers=PREMIUM))
        await asyncio.wait_for(slow.started.wait(), 5)
        assert core.loads["fp16"].now() == 1
        request.cancel()  # the client goes away: the server's task for it is cancelled
        await asyncio.wait_for(slow.closed_early.wait(), 5)
    await poll_until_async(lambda: core.loads["fp16"].now() == 0, "the call to leave the in-flight count")


async def test_a_client_gone_mid_stream_closes_the_engine_stream_at_once() -> None:
    core = make_core()
    slow = Slow(streamed=True)
    core.variants["fp16"] = slow  # type: ignore[assignment]
    request = parse_request("chat", {**CHAT, "stream": True})
    principal = authenticate(core.config, PREMIUM["authorization"])
    with core.tracer.start_as_current_span("test") as span:
        response = await core.serve(core.config, principal, "chat", request, "user", None, span)
    assert isinstance(response, StreamingResponse)
    first_packet = asyncio.Event()

    async def read_like_a_server() -> None:  # what Starlette does with the body until the client hangs up
        async for _ in response.body_iterator:
            first_packet.set()

    reading = asyncio.create_task(read_like_a_server())
    await asyncio.wait_for(first_packet.wait(), 5)
    reading.cancel()  # the client disconnected: Starlette cancels the task that streams the body
    await asyncio.wait_for(slow.closed_early.wait(), 5)
    assert core.loads["fp16"].now() == 0


class FakeResponseGenerator:
    """Ray Serve's DeploymentResponseGenerator as RayVariant uses it: assigned, iterated, and cancelled."""

    def __init__(self, items: list[str]) -> None:
        self.items = items
        self.cancelled = False

    def __aiter__(self) -> FakeResponseGenerator:
        return self

    async def __anext__(self) -> str:
        if not self.items:
            raise StopAsyncIteration
        return self.items.pop(0)

    def cancel(self) -> None:
        self.cancelled = True

    async def _fetch_future_result_async(self) -> None:
        """Serve's wait for a replica to take the request: at once here, one is always there."""


class FakeHandle:
    app_name = "serving"
    deployment_name = "LLMServer:fp16"

    def __init__(self) -> None:
        self.answers: list[FakeResponseGenerator] = []

    def options(self, **_: Any) -> FakeHandle:
        return self

    @property
    def chat(self) -> FakeHandle:
        return self

    def remote(self, *_: Any) -> FakeResponseGenerator:
        self.answers.append(FakeResponseGenerator(["a", "b", "c"]))
        return self.answers[-1]


async def test_ray_variant_cancels_the_engine_call_only_when_closed_before_the_end() -> None:
    handle = FakeHandle()
    variant = RayVariant(handle)
    request = parse_request("chat", CHAT)
    whole = [item async for item in variant.call("chat", request)]
    assert whole == ["a", "b", "c"]
    assert not handle.answers[0].cancelled
    stream = variant.call("chat", request)
    assert await anext(stream) == "a"
    await stream.aclose()
    assert handle.answers[1].cancelled
