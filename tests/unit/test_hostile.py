"""Hostile and careless clients against the real router code (real vLLM request models, fake engines):
malformed bodies, limits passed as strings, floats or batches, server-only fields, repeated feedback,
a replica dead before its first byte, and a stream that breaks after its 200 went out."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest

from serving.config import load_config
from serving.intake.admission import RateLimit
from serving.metrics import sample as metric_sample
from serving.rollout.signals import FeedbackSignal, RequestSignal
from serving.route import attribution, routing
from serving.route.core import RouterCore, create_app
from serving.variants.client import FakeVariant

REPO = Path(__file__).resolve().parents[2]
PREMIUM = {"authorization": "Bearer demo-premium"}
CHAT = {"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"model": "demo-chat", "prompt": "We the", "max_tokens": 2}
# Wrong types, null, negative, huge and numeric strings, for every field of both request models.
HOSTILE_VALUES: list[Any] = [None, -1, 0, 10**12, "4000", "abc", 4000.0, 1e308, True, [], {}, [1, "x", None], {"a": 1}]


def hostile_bodies() -> list[tuple[str, dict[str, Any]]]:
    cases: list[tuple[str, dict[str, Any]]] = []
    for path, model, base in (
        ("/v1/chat/completions", ChatCompletionRequest, CHAT),
        ("/v1/completions", CompletionRequest, COMPLETION),
    ):
        for field in sorted(model.model_fields):
            cases.extend((path, {**base, field: value}) for value in HOSTILE_VALUES)
    return cases


@pytest.fixture
def core() -> RouterCore:
    config = load_config(REPO / "deploy" / "demo.yaml")
    return RouterCore(config, {name: FakeVariant(name) for name in config.variants})


@pytest.fixture
async def client(core: RouterCore) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(lambda: core), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://router") as http:
        yield http


async def test_no_malformed_body_gets_a_5xx_and_every_refusal_is_openai_shaped(client: httpx.AsyncClient) -> None:
    cases = hostile_bodies()
    assert len(cases) > 1000  # every field of both models, each with every hostile value
    statuses = []
    for path, body in cases:
        answer = await client.post(path, json=body, headers=PREMIUM)
        statuses.append(answer.status_code)
        assert answer.status_code < 500, (path, body, answer.text)
        if answer.status_code >= 400:
            error = answer.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, answer.text
            assert "Traceback" not in error["message"]
    assert statuses.count(400) > len(cases) // 2  # most of them really are refused


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {**CHAT, "messages": None}, None),
        ("/v1/chat/completions", {**CHAT, "stream_options": {"include_usage": True}}, "stream_options"),
        ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {**CHAT, "structured_outputs": -1}, None),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
        ("/v1/chat/completions", {**CHAT, "messages": []}, "messages"),
    ],
)
async def test_vllm_validator_failures_are_400_naming_the_parameter(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], param: str | None
) -> None:
    answer = await client.post(path, json=body, headers=PREMIUM)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param
    assert answer.json()["error"]["type"] == "invalid_request_error"


# Each limited field, over its demo limit, sent as an integer, a numeric string and a float.
OVER_LIMIT = [
    ("/v1/chat/completions", "n", 5),
    ("/v1/completions", "n", 5),
    ("/v1/chat/completions", "max_tokens", 513),
    ("/v1/chat/completions", "max_completion_tokens", 513),
    ("/v1/completions", "max_tokens", 513),
    ("/v1/completions", "min_tokens", 513),
    ("/v1/completions", "logprobs", 6),
    ("/v1/chat/completions", "prompt_logprobs", 6),
]


@pytest.mark.parametrize(("path", "field", "value"), OVER_LIMIT)
@pytest.mark.parametrize("spelled", [int, str, float], ids=["int", "string", "float"])
async def test_no_limit_can_be_passed_with_a_string_or_a_float(
    client: httpx.AsyncClient, core: RouterCore, path: str, field: str, value: int, spelled: type
) -> None:
    base = CHAT if path.endswith("chat/completions") else COMPLETION
    body = {**base, field: spelled(value)}
    if field == "min_tokens":
        body["max_tokens"] = 2
    answer = await client.post(path, json=body, headers=PREMIUM)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == field
    assert not any(v.requests for v in core.variants.values())  # type: ignore[attr-defined]


async def test_chat_top_logprobs_are_limited(client: httpx.AsyncClient) -> None:
    answer = await client.post(
        "/v1/chat/completions", json={**CHAT, "logprobs": True, "top_logprobs": "6"}, headers=PREMIUM
    )
    assert (answer.status_code, answer.json()["error"]["param"]) == (400, "top_logprobs")


@pytest.mark.parametrize(
    ("field", "value", "what"),
    [
        ("prompt", ["a"] * 9, "prompts"),
        ("prompt", [[1, 2]] * 9, "prompts"),
        ("stop", ["x"] * 9, "stop"),  # vLLM's own model caps stop strings at 4, before ours
        ("stop_token_ids", list(range(9)), "entries"),
        ("bad_words", ["x"] * 9, "entries"),
        ("logit_bias", {str(i): 1 for i in range(301)}, "entries"),
        ("allowed_token_ids", list(range(301)), "entries"),
    ],
)
async def test_batches_and_lists_that_multiply_work_are_limited(
    client: httpx.AsyncClient, field: str, value: Any, what: str
) -> None:
    answer = await client.post("/v1/completions", json={**COMPLETION, field: value}, headers=PREMIUM)
    assert answer.status_code == 400, answer.text
    assert (answer.json()["error"]["param"], what in answer.json()["error"]["message"]) == (field, True)


async def test_within_the_limits_is_answered(client: httpx.AsyncClient) -> None:
    body = {**COMPLETION, "prompt": ["a"] * 8, "stop": ["x"] * 4, "stop_token_ids": [1] * 8, "n": "4", "logprobs": 5}
    assert (await client.post("/v1/completions", json=body, headers=PREMIUM)).status_code == 200


@pytest.mark.parametrize(
    "field", ["kv_transfer_params", "vllm_xargs", "request_id", "priority", "chat_template", "ec_transfer_params"]
)
async def test_server_only_fields_are_refused(client: httpx.AsyncClient, field: str) -> None:
    value: Any = {"a": "b"} if field.endswith(("params", "xargs")) else ("x" if field != "priority" else -100)
    answer = await client.post("/v1/chat/completions", json={**CHAT, field: value}, headers=PREMIUM)
    assert answer.status_code == 400, answer.text
    assert (answer.json()["error"]["param"], answer.json()["error"]["code"]) == (field, "field_not_allowed")


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/completions", {"model": "demo-chat", "prompt": "We the"}),  # vLLM's own default there is 16
        ("/v1/completions", {"model": "demo-chat", "prompt": "We the", "max_tokens": None}),
    ],
)
@pytest.mark.parametrize("max_tokens", [512, 8])  # a limit under vLLM's default refuses nothing unasked
async def test_a_request_without_max_tokens_gets_the_configured_default(
    client: httpx.AsyncClient, core: RouterCore, path: str, body: dict[str, Any], max_tokens: int
) -> None:
    default = min(256, max_tokens)
    limits = core.config.limits.model_copy(update={"max_tokens": max_tokens, "default_max_tokens": default})
    core.apply(core.config.model_copy(update={"limits": limits}))
    answer = await client.post(path, json=body, headers=PREMIUM)
    assert answer.status_code == 200, answer.text
    sent = core.variants["fp16"].requests[-1]  # type: ignore[attr-defined]
    assert sent.max_tokens == limits.default_max_tokens


async def answer_id(client: httpx.AsyncClient) -> str:
    answer = await client.post("/v1/chat/completions", json=CHAT, headers=PREMIUM)
    return str(answer.json()["id"])


async def test_repeated_feedback_on_one_response_counts_once(client: httpx.AsyncClient, core: RouterCore) -> None:
    response_id = await answer_id(client)
    vote = {"response_id": response_id, "overridden": True}
    assert (await client.post("/v1/feedback", json=vote, headers=PREMIUM)).status_code == 200
    for _ in range(5):
        again = await client.post("/v1/feedback", json=vote, headers=PREMIUM)
        assert (again.status_code, again.json()["error"]["code"]) == (409, "duplicate")
    labels = {"variant": "fp16", "tier": "premium", "kind": "feedback"}
    assert metric_sample(core.metrics, "ray_serving_overrides_total", labels) == 1
    assert [s for s in core.follower.signals if isinstance(s, FeedbackSignal)] == [
        FeedbackSignal("premium", "fp16", True, response_id)
    ]


async def test_feedback_is_rate_limited_per_key_with_retry_after(client: httpx.AsyncClient, core: RouterCore) -> None:
    core.feedback_limit = RateLimit(3)
    ids = [await answer_id(client) for _ in range(4)]
    answers = [
        await client.post("/v1/feedback", json={"response_id": i, "overridden": False}, headers=PREMIUM) for i in ids
    ]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert answers[-1].json()["error"]["type"] == "rate_limit_error"
    assert int(answers[-1].headers["retry-after"]) >= 1


def test_rate_limit_refills_over_time() -> None:
    now = [0.0]
    limit = RateLimit(60, clock=lambda: now[0])
    assert all(limit.take("k") == 0 for _ in range(60))
    assert limit.take("k") == pytest.approx(1.0)
    now[0] += 1.0
    assert limit.take("k") == 0
    assert limit.take("other") == 0  # per key


def test_sticky_buckets_are_keyed_by_the_server_secret() -> None:
    users = [f"user-{i}" for i in range(2000)]
    plain = [routing.bucket("standard", u) for u in users]
    keyed = [routing.bucket("standard", u, b"secret-1") for u in users]
    assert keyed == [routing.bucket("standard", u, b"secret-1") for u in users]  # still sticky
    assert sum(a == b for a, b in zip(plain, keyed, strict=True)) < 10  # not computable without it
    other = [routing.bucket("standard", u, b"secret-2") for u in users]
    assert sum(a == b for a, b in zip(keyed, other, strict=True)) < 10
    share = sum(b < 50_000 for b in keyed) / len(keyed)
    assert 0.45 < share < 0.55  # and still uniform


async def test_a_stream_cut_by_an_engine_failure_ends_with_an_error_event_and_is_counted(
    client: httpx.AsyncClient, core: RouterCore
) -> None:
    core.variants["fp16"] = FakeVariant("fp16", fail_midstream=RuntimeError("replica died"))
    answer = await client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=PREMIUM)
    assert answer.status_code == 200  # the status line went out before the failure
    events = [e.removeprefix("data: ") for e in answer.text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert (error["code"], error["type"]) == ("stream_interrupted", "service_unavailable")
    assert "replica died" not in answer.text
    labels = {"variant": "fp16", "tier": "premium", "role": "primary", "outcome": "error"}
    assert metric_sample(core.metrics, "ray_serving_requests_total", labels) == 1
    assert metric_sample(core.metrics, "ray_serving_requests_total", {**labels, "outcome": "ok"}) is None
    (signal,) = [s for s in core.follower.signals if isinstance(s, RequestSignal)]
    assert signal.ok is False  # the error-rate check sees it


@pytest.mark.parametrize("stream", [False, True])
async def test_a_replica_dead_before_the_first_byte_is_a_503_counted_as_the_variants_error(
    client: httpx.AsyncClient, core: RouterCore, stream: bool
) -> None:
    core.variants["fp16"] = FakeVariant("fp16", fail=RuntimeError("replica died"))
    answer = await client.post("/v1/chat/completions", json={**CHAT, "stream": stream}, headers=PREMIUM)
    assert answer.status_code == 503  # nothing went out yet: a status a client retries on
    error = answer.json()["error"]
    assert (error["code"], error["type"]) == ("variant_unavailable", "service_unavailable")
    assert "replica died" not in answer.text
    labels = {"variant": "fp16", "tier": "premium", "role": "primary", "outcome": "error"}
    assert metric_sample(core.metrics, "ray_serving_requests_total", labels) == 1
    (signal,) = [s for s in core.follower.signals if isinstance(s, RequestSignal)]
    assert (signal.variant, signal.ok) == ("fp16", False)  # the error-rate check sees it


async def test_an_engine_error_event_in_a_stream_is_counted_as_an_error(
    client: httpx.AsyncClient, core: RouterCore
) -> None:
    class ErrorEventVariant(FakeVariant):
        async def call(self, kind: Any, request: Any) -> AsyncIterator[Any]:
            yield ['data: {"id": "x", "choices": [{"index": 0, "delta": {"content": "a"}}]}\n\n']
            yield ['data: {"error": {"message": "engine failed", "type": "InternalServerError", "code": 500}}\n\n']

    core.variants["fp16"] = ErrorEventVariant("fp16")
    answer = await client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=PREMIUM)
    assert "engine failed" in answer.text
    labels = {"variant": "fp16", "tier": "premium", "role": "primary", "outcome": "error"}
    assert metric_sample(core.metrics, "ray_serving_requests_total", labels) == 1


async def test_engine_requests_run_under_ids_the_server_chose(client: httpx.AsyncClient, core: RouterCore) -> None:
    for _ in range(2):
        answer = await client.post("/v1/chat/completions", json=CHAT, headers={**PREMIUM, "x-request-id": "mine"})
        assert answer.status_code == 200
    sent = core.variants["fp16"].requests  # type: ignore[attr-defined]
    ids = [request.request_id for request in sent]
    assert len(set(ids)) == 2
    assert all("mine" not in i for i in ids)
    assert all(attribution.verify(core.signing_keys(), i, 60).variant == "fp16" for i in ids)
    assert all("request_id" in request.model_fields_set for request in sent)  # so Ray Serve keeps it


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"overridden": True}, "response_id"),
        ({"response_id": "", "overridden": True}, "response_id"),
        ({"response_id": 7, "overridden": True}, "response_id"),
        ({"response_id": "x"}, "overridden"),
        ({"response_id": "x", "overridden": "yes"}, "overridden"),
        ({"response_id": "x", "overridden": 1}, "overridden"),  # no truthy numbers: a vote is true or false
        ({"response_id": "x", "overridden": True, "label": ["no"]}, "label"),
    ],
)
async def test_a_malformed_feedback_body_is_a_400_naming_the_field(
    client: httpx.AsyncClient, body: dict[str, Any], param: str
) -> None:
    answer = await client.post("/v1/feedback", json=body, headers=PREMIUM)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param
    assert answer.json()["error"]["code"] == "invalid_parameter"


@pytest.mark.parametrize("response_id", ["x.\u00e9\u00e9", "chatcmpl-\u00e9.\u00e9", "\u00e9"])
async def test_a_response_id_with_non_ascii_characters_is_a_400(client: httpx.AsyncClient, response_id: str) -> None:
    """Found by schemathesis: the signature check raised a TypeError on them (a 500)."""
    answer = await client.post("/v1/feedback", json={"response_id": response_id, "overridden": True}, headers=PREMIUM)
    assert answer.status_code == 400, answer.text
    assert (answer.json()["error"]["param"], answer.json()["error"]["code"]) == ("response_id", "bad_id")
