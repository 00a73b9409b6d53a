"""Shadowing, comparison metrics, feedback and traces through the router, over fake variants."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from serving.config import load_config
from serving.metrics import sample as metric_sample
from serving.route.core import RouterCore, create_app
from serving.tracing import make_tracer
from serving.variants.client import Endpoint, FakeVariant
from serving.variants.load import EngineLoad
from tests.polling import poll_until_async

REPO = Path(__file__).resolve().parents[2]
CHAT = {"model": "demo-chat", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4}


def make_core(
    *,
    shadow_rate: float,
    noise_floor_rate: float = 0.0,
    delay_s: float = 0.0,
    max_concurrency: int = 4,
    spans: InMemorySpanExporter | None = None,
    variants: dict[str, FakeVariant] | None = None,
) -> RouterCore:
    config = load_config(REPO / "deploy" / "demo.yaml")
    tiers = dict(config.tiers)
    shadow = tiers["batch"].shadow
    assert shadow is not None
    tiers["batch"] = tiers["batch"].model_copy(update={"shadow": shadow.model_copy(update={"rate": shadow_rate})})
    config = config.model_copy(
        update={
            "tiers": tiers,
            "shadowing": config.shadowing.model_copy(
                update={"noise_floor_rate": noise_floor_rate, "max_concurrency": max_concurrency}
            ),
        }
    )
    fakes = {name: FakeVariant(name, delay_s=delay_s if name == "fp16" else 0.0) for name in config.variants}
    core = RouterCore(config, {**fakes, **(variants or {})}, tracer=make_tracer(exporter=spans) if spans else None)
    core.shadower.rng = random.Random(7)
    return core


def client_for(core: RouterCore) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(lambda: core)), base_url="http://r")


def sample(core: RouterCore, name: str, **labels: str) -> float:
    return metric_sample(core.metrics, name, labels) or 0.0


async def settle(core: RouterCore) -> None:
    while core.shadower.tasks:
        await asyncio.gather(*core.shadower.tasks)


@pytest.mark.parametrize("stream", [False, True])
async def test_shadowed_pairs_are_compared_and_counted(stream: bool) -> None:
    core = make_core(shadow_rate=1.0, max_concurrency=16)
    async with client_for(core) as client:
        for i in range(6):
            answer = await client.post(
                "/v1/chat/completions",
                json={**CHAT, "user": f"u{i}", "stream": stream},
                headers={"authorization": "Bearer demo-batch"},
            )
            assert answer.status_code == 200
    await settle(core)
    total = sum(
        sample(core, "ray_serving_shadow_comparisons_total", tier="batch", primary=p, shadow="fp16", kind="candidate")
        for p in ("int8", "awq")
    )
    assert total == 6
    disagreements = sum(
        sample(core, "ray_serving_shadow_disagreements_total", tier="batch", primary=p, shadow="fp16", kind="candidate")
        for p in ("int8", "awq")
    )
    assert disagreements == 6  # "answer from int8/awq" never equals "answer from fp16"
    drift = sum(
        sample(core, "ray_serving_score_drift_sum", tier="batch", primary=p, shadow="fp16", kind="candidate")
        for p in ("int8", "awq")
    )
    assert drift > 0


async def test_noise_floor_pairs_a_variant_with_itself_and_agrees() -> None:
    core = make_core(shadow_rate=1.0, noise_floor_rate=1.0)
    async with client_for(core) as client:
        for i in range(4):
            await client.post(
                "/v1/chat/completions", json={**CHAT, "user": f"u{i}"}, headers={"authorization": "Bearer demo-batch"}
            )
    await settle(core)
    pairs = {
        p: sample(core, "ray_serving_shadow_comparisons_total", tier="batch", primary=p, shadow=p, kind="noise_floor")
        for p in ("int8", "awq")
    }
    assert sum(pairs.values()) == 4
    for p in ("int8", "awq"):
        assert (
            sample(
                core, "ray_serving_shadow_disagreements_total", tier="batch", primary=p, shadow=p, kind="noise_floor"
            )
            == 0
        )
        assert sample(core, "ray_serving_score_drift_sum", tier="batch", primary=p, shadow=p, kind="noise_floor") == 0


async def test_the_answer_does_not_wait_for_the_shadow_and_overflow_is_dropped() -> None:
    # fp16 (the shadow target) takes 0.5 s per call; the primary answers at once.
    core = make_core(shadow_rate=1.0, delay_s=0.5, max_concurrency=2)
    async with client_for(core) as client:
        started = asyncio.get_running_loop().time()
        for i in range(5):
            answer = await client.post(
                "/v1/chat/completions", json={**CHAT, "user": f"u{i}"}, headers={"authorization": "Bearer demo-batch"}
            )
            assert answer.headers["x-served-variant"] in {"int8", "awq"}
        elapsed = asyncio.get_running_loop().time() - started
    assert elapsed < 0.5  # five answers before a single shadow call could have finished
    assert sample(core, "ray_serving_shadow_dropped_total", tier="batch", reason="saturated") == 3
    await settle(core)
    assert (
        sum(
            sample(
                core, "ray_serving_shadow_comparisons_total", tier="batch", primary=p, shadow="fp16", kind="candidate"
            )
            for p in ("int8", "awq")
        )
        == 2
    )


async def test_feedback_counts_overrides_for_the_variant_that_answered() -> None:
    core = make_core(shadow_rate=0.0)
    async with client_for(core) as client:
        answer = await client.post("/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer demo-premium"})
        response_id = answer.json()["id"]
        ok = await client.post(
            "/v1/feedback",
            json={"response_id": response_id, "overridden": True, "label": "wrong"},
            headers={"authorization": "Bearer demo-premium"},
        )
        assert ok.status_code == 200
        assert ok.json()["variant"] == "fp16"
        unknown = await client.post(
            "/v1/feedback",
            json={"response_id": "nope", "overridden": True},
            headers={"authorization": "Bearer demo-premium"},
        )
        assert (unknown.status_code, unknown.json()["error"]["code"]) == (400, "bad_id")  # not an id we signed
        bad = await client.post(
            "/v1/feedback",
            json={"response_id": response_id, "overridden": "yes"},
            headers={"authorization": "Bearer demo-premium"},
        )
        assert bad.status_code == 400
        anonymous = await client.post("/v1/feedback", json={"response_id": response_id, "overridden": True})
        assert anonymous.status_code == 401
    assert sample(core, "ray_serving_overrides_total", variant="fp16", tier="premium", kind="feedback") == 1
    assert sample(core, "ray_serving_feedback_total", variant="fp16", tier="premium") == 1


async def test_requests_latency_and_tokens_are_recorded() -> None:
    core = make_core(shadow_rate=0.0)
    async with client_for(core) as client:
        await client.post("/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer demo-premium"})
    labels = {"variant": "fp16", "tier": "premium", "role": "primary"}
    assert sample(core, "ray_serving_requests_total", **labels, outcome="ok") == 1
    assert sample(core, "ray_serving_request_duration_seconds_count", **labels) == 1
    # A whole answer has no observable first token, nor a decode time apart from the prompt's.
    assert sample(core, "ray_serving_time_to_first_token_seconds_count", **labels) == 0
    assert sample(core, "ray_serving_time_per_output_token_seconds_count", **labels) == 0
    assert sample(core, "ray_serving_tokens_total", variant="fp16", tier="premium", direction="out") == 3


@pytest.mark.parametrize("client_asks_usage", [False, True])
async def test_streamed_time_per_output_token_counts_tokens_not_chunks(client_asks_usage: bool) -> None:
    # Three tokens in two chunks ("answer from" + "fp16"), 0.2 s apart: per token after the first that
    # is 0.2 s / 2, where counting chunks would say 0.2 s / 1.
    fp16 = FakeVariant("fp16", words_per_chunk=2, chunk_delay_s=0.2)
    core = make_core(shadow_rate=0.0, variants={"fp16": fp16})
    body = {**CHAT, "stream": True, **({"stream_options": {"include_usage": True}} if client_asks_usage else {})}
    async with client_for(core) as client:
        answer = await client.post("/v1/chat/completions", json=body, headers={"authorization": "Bearer demo-premium"})
    events = [line.removeprefix("data: ") for line in answer.text.split("\n\n") if line.startswith("data: {")]
    usage_events = [e for e in map(json.loads, events) if e.get("usage") and not e["choices"]]
    assert len(usage_events) == (1 if client_asks_usage else 0)  # the router's own ask is not passed on
    assert fp16.requests[-1].stream_options.include_usage  # the engine was asked for token counts
    labels = {"variant": "fp16", "tier": "premium", "role": "primary"}
    assert sample(core, "ray_serving_time_to_first_token_seconds_count", **labels) == 1
    assert sample(core, "ray_serving_time_per_output_token_seconds_count", **labels) == 1
    assert 0.1 <= sample(core, "ray_serving_time_per_output_token_seconds_sum", **labels) < 0.2
    assert sample(core, "ray_serving_tokens_total", variant="fp16", tier="premium", direction="out") == 3


async def test_each_request_is_a_trace_with_routing_call_and_shadow_spans() -> None:
    spans = InMemorySpanExporter()
    core = make_core(shadow_rate=1.0, spans=spans)
    async with client_for(core) as client:
        answer = await client.post("/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer demo-batch"})
    await settle(core)
    finished = {s.name: s for s in spans.get_finished_spans()}
    assert set(finished) >= {"router chat", "route", "variant call", "shadow comparison"}
    assert len({s.context.trace_id for s in finished.values()}) == 1
    root = finished["router chat"]
    assert format(root.context.trace_id, "032x") == answer.headers["x-trace-id"]
    assert finished["route"].parent is not None
    assert finished["route"].parent.span_id == root.context.span_id
    assert dict(finished["route"].attributes or {})["variant"] == answer.headers["x-served-variant"]


async def test_completions_are_shadowed_too() -> None:
    core = make_core(shadow_rate=1.0, max_concurrency=16)
    async with client_for(core) as client:
        for i in range(3):
            body = {"model": "demo-chat", "prompt": "We the people", "max_tokens": 4, "user": f"c{i}"}
            assert (
                await client.post("/v1/completions", json=body, headers={"authorization": "Bearer demo-batch"})
            ).status_code == 200
    await settle(core)
    assert sample(core, "ray_serving_shadow_dropped_total", tier="batch", reason="failed") == 0
    assert (
        sum(
            sample(
                core, "ray_serving_shadow_comparisons_total", tier="batch", primary=p, shadow="fp16", kind="candidate"
            )
            for p in ("int8", "awq")
        )
        == 3
    )


async def test_shadows_are_shed_while_the_engines_are_busy_with_primaries() -> None:
    # Four slow primaries on fp16 (the premium baseline and the batch tier's shadow target) keep it busy:
    # a batch answer finishing meanwhile sheds its shadow; once fp16 is idle again, shadows run.
    core = make_core(shadow_rate=1.0, delay_s=0.3, max_concurrency=16)
    core.shadower.max_primary_in_flight = 2
    core.loads = {name: EngineLoad(average_over_s=0.05) for name in core.loads}  # a short memory, for a fast test
    async with client_for(core) as client:
        premium = [
            asyncio.create_task(
                client.post(
                    "/v1/chat/completions",
                    json={**CHAT, "user": f"p{i}"},
                    headers={"authorization": "Bearer demo-premium"},
                )
            )
            for i in range(4)
        ]
        await poll_until_async(lambda: core.loads["fp16"].now() == 4, "four primaries in flight on fp16")
        assert core.in_flight("fp16") > 3
        busy = await client.post(
            "/v1/chat/completions", json={**CHAT, "user": "b0"}, headers={"authorization": "Bearer demo-batch"}
        )
        assert busy.status_code == 200
        assert sample(core, "ray_serving_shadow_dropped_total", tier="batch", reason="busy") == 1
        for answer in await asyncio.gather(*premium):
            assert answer.status_code == 200
        assert core.loads["fp16"].now() == 0
        await poll_until_async(lambda: core.in_flight("fp16") < 1, "fp16 idle again, on average too")
        idle = await client.post(
            "/v1/chat/completions", json={**CHAT, "user": "b1"}, headers={"authorization": "Bearer demo-batch"}
        )
        assert idle.status_code == 200
    await settle(core)
    assert sample(core, "ray_serving_shadow_dropped_total", tier="batch", reason="busy") == 1
    compared = sum(
        sample(core, "ray_serving_shadow_comparisons_total", tier="batch", primary=p, shadow="fp16", kind="candidate")
        for p in ("int8", "awq")
    )
    assert compared == 1


async def test_every_shadow_call_yields_to_primaries_in_the_engine() -> None:
    from serving.shadow.shadower import SHADOW_PRIORITY

    core = make_core(shadow_rate=1.0, max_concurrency=16)
    async with client_for(core) as client:
        for stream in (False, True):
            answer = await client.post(
                "/v1/chat/completions",
                json={**CHAT, "user": "u1", "stream": stream},
                headers={"authorization": "Bearer demo-batch"},
            )
            assert answer.status_code == 200
    await settle(core)
    fakes = [v for v in core.variants.values() if isinstance(v, FakeVariant)]
    calls = [r for fake in fakes for r in fake.requests]
    primaries = [r for r in calls if r.prompt_logprobs is None and r.priority == 0]
    shadows = [r for r in calls if r.priority == SHADOW_PRIORITY]
    assert len(primaries) == 2  # the two answers the client got
    assert len(shadows) == 2 * 4  # each comparison: the shadow's answer and three scoring calls
    assert len(calls) == len(primaries) + len(shadows)


@pytest.mark.parametrize("outcome", ["ok", "stream", "engine_error", "failure", "midstream"])
async def test_a_call_is_in_flight_until_the_engine_is_done_with_it(outcome: str) -> None:
    fake = {
        "ok": FakeVariant("fp16"),
        "stream": FakeVariant("fp16"),
        "engine_error": FakeVariant("fp16", error_status=400),
        "failure": FakeVariant("fp16", fail=RuntimeError("down")),
        "midstream": FakeVariant("fp16", fail_midstream=RuntimeError("died")),
    }[outcome]
    core = make_core(shadow_rate=0.0, variants={"fp16": fake})
    stream = outcome in ("stream", "midstream")
    async with client_for(core) as client:
        answer = await client.post(
            "/v1/chat/completions",
            json={**CHAT, "stream": stream},
            headers={"authorization": "Bearer demo-premium"},
        )
        assert answer.status_code in (200, 400, 503)
    assert core.loads["fp16"].now() == 0


async def test_a_running_comparison_is_cancelled_when_primaries_make_its_engine_busy() -> None:
    # fp16, the batch tier's shadow target, takes 0.5 s per call. A comparison starts while it is idle;
    # then three premium primaries arrive on fp16, and the comparison gives way.
    core = make_core(shadow_rate=1.0, delay_s=0.5, max_concurrency=16)
    core.shadower.max_primary_in_flight = 2
    async with client_for(core) as client:
        batch = await client.post("/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer demo-batch"})
        assert batch.status_code == 200
        assert len(core.shadower.tasks) == 1
        (comparison,) = core.shadower.tasks
        premium = [
            client.post(
                "/v1/chat/completions", json={**CHAT, "user": f"p{i}"}, headers={"authorization": "Bearer demo-premium"}
            )
            for i in range(3)
        ]
        answers = await asyncio.gather(*premium)
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert comparison.cancelled()
    assert sample(core, "ray_serving_shadow_dropped_total", tier="batch", reason="preempted") == 1
    compared = sum(
        sample(core, "ray_serving_shadow_comparisons_total", tier="batch", primary=p, shadow="fp16", kind="candidate")
        for p in ("int8", "awq")
    )
    assert compared == 0
    assert not core.shadower.tasks


@pytest.mark.parametrize("kind", ["chat", "completions"])
def test_a_scoring_request_asks_no_min_tokens_of_its_one_token(kind: Endpoint) -> None:
    # Seen on the real stack: every shadow of a request with min_tokens above 1 failed, as the engine
    # refuses min_tokens > max_tokens.
    from serving.intake.protocol import parse_request
    from serving.shadow.shadower import scoring_request

    prompt = {"messages": [{"role": "user", "content": "x"}]} if kind == "chat" else {"prompt": "x"}
    request = parse_request(kind, {"model": "m", "max_tokens": 8, "min_tokens": 6, **prompt})
    scoring = scoring_request(kind, request, "an answer")
    assert (scoring.max_tokens, scoring.min_tokens) == (1, 0)


async def test_a_stream_is_counted_when_the_client_hangs_up_on_reading_done() -> None:
    # The openai client closes the connection as soon as it reads [DONE]; Starlette then cancels the
    # response, so whatever the relay does after its last yield never runs. Seen on the real stack as a
    # missing time-per-output-token series: the answer must be counted before its last packet goes out.
    core = make_core(shadow_rate=0.0, variants={"fp16": FakeVariant("fp16", chunk_delay_s=0.01)})
    app = create_app(lambda: core)
    body = json.dumps({**CHAT, "stream": True}).encode()
    done_sent = asyncio.Event()
    asked = False

    async def receive() -> dict[str, Any]:
        nonlocal asked
        if not asked:
            asked = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done_sent.wait()
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.body" and b"[DONE]" in message.get("body", b""):
            done_sent.set()
            await asyncio.sleep(0.05)  # the hang-up lands while this packet is being written

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"authorization", b"Bearer demo-premium"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1),
        "server": ("r", 80),
    }
    await app(scope, receive, send)
    labels = {"variant": "fp16", "tier": "premium", "role": "primary"}
    assert done_sent.is_set()
    assert sample(core, "ray_serving_requests_total", **labels, outcome="ok") == 1
    assert sample(core, "ray_serving_time_per_output_token_seconds_count", **labels) == 1
