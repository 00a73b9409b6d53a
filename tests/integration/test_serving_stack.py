"""The real stack: `serving serve` (Ray Serve, the router, three vLLM CPU engines) on the demo family,
driven with the official openai client."""

from __future__ import annotations

import asyncio
import re

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from serving.engine import hardware
from tests.integration.conftest import BASE, METRICS_PORT, Configure, Stack, apply_config, served_variants
from tests.polling import poll_until_async
from tests.unit.test_hostile import hostile_bodies

pytestmark = pytest.mark.integration

TIER_VARIANTS = {
    "demo-premium": {"fp16"},
    "demo-standard": {"fp16", "int8"},
    "demo-batch": {"int8", "awq"},
    "demo-admin": {"fp16", "int8"},
}


def client(key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{BASE}/v1", api_key=key, max_retries=0, timeout=120)


@pytest.mark.parametrize("key", list(TIER_VARIANTS))
def test_each_demo_key_chats_and_completes_streaming_and_not(stack: Stack, key: str) -> None:
    api = client(key)
    raw = api.chat.completions.with_raw_response.create(
        model="demo-chat", messages=[{"role": "user", "content": "We the people"}], max_tokens=8, user="alice"
    )
    chat = raw.parse()
    assert chat.model == "demo-chat"
    assert chat.choices[0].message.content
    assert raw.headers["x-served-variant"] in TIER_VARIANTS[key]

    pieces = api.chat.completions.create(
        model="demo-chat", messages=[{"role": "user", "content": "Hello"}], max_tokens=6, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)

    completion = api.completions.create(
        model="demo-chat",
        prompt="When in the Course of human events",
        max_tokens=6,
        n=2,
        temperature=0.8,
        top_p=0.9,
        seed=7,
        stop=["\n"],
        logprobs=2,
        user="bob",
    )
    assert completion.model == "demo-chat"
    assert len(completion.choices) == 2
    assert completion.choices[0].logprobs is not None
    assert completion.choices[0].logprobs.tokens

    streamed = api.completions.create(model="demo-chat", prompt="Four score", max_tokens=6, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices)


# premium's streams pass through unparsed; batch's may be shadowed (rate 0.2), and then are parsed
@pytest.mark.parametrize("key", ["demo-premium", "demo-batch"])
def test_streams_end_with_usage_only_for_clients_that_ask(stack: Stack, key: str) -> None:
    api = client(key)
    hello: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello"}]
    asked = list(
        api.chat.completions.create(
            model="demo-chat",
            messages=hello,
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
            user="u1",
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in asked if c.choices)
    assert asked[-1].choices == []
    assert asked[-1].usage is not None
    assert 1 <= asked[-1].usage.completion_tokens <= 6  # a random-weight model may stop early
    plain = list(api.chat.completions.create(model="demo-chat", messages=hello, max_tokens=6, stream=True, user="u1"))
    assert "".join(c.choices[0].delta.content or "" for c in plain if c.choices)
    assert all(c.usage is None and c.choices for c in plain)


def test_models_lists_the_model_with_variant_provenance(stack: Stack) -> None:
    listing = client("demo-premium").models.list()
    assert [m.id for m in listing.data] == ["demo-chat"]
    variants = listing.data[0].model_extra["variants"]  # type: ignore[index]
    assert variants["awq"]["provenance"]["quantization"]["scheme"] == "W4A16_ASYM"


def test_models_shows_each_engine_verified_here_and_int8_on_one_kernel_path(stack: Stack) -> None:
    variants = client("demo-premium").models.list().data[0].model_extra["variants"]  # type: ignore[index]
    capabilities = hardware.detect()
    order = [c.dtype for c in hardware.dtype_order("float16", capabilities)]
    for name, precision in (("fp16", "fp16"), ("int8", "int8"), ("awq", "awq")):
        assert variants[name]["precision"] == precision
        verification = variants[name]["verification"]
        assert verification["fit"], verification
        assert variants[name]["unfit"] is None
        # The dtype it serves in is the one that passed, tried in the documented order.
        tried = [a["dtype"] for a in verification["attempts"]]
        assert variants[name]["dtype"] == tried[-1]
        assert verification["attempts"][-1]["outcome"] == "passed"
        assert set(tried) <= set(order)
    assert "agreement" in variants["int8"]["verification"]["reason"]
    # int8 with asymmetric activations: oneDNN on every x86 CPU, AMX or not (the SGL kernel takes symmetric only).
    (int8_kernel,) = [k for k in variants["int8"]["linear_kernels"] if k.startswith("CompressedTensorsW8A8Int8")]
    assert int8_kernel.rsplit("/", 1)[-1] == "onednn", (int8_kernel, capabilities.describe())


def test_the_console_shows_progress_per_engine_and_no_library_logs(stack: Stack) -> None:
    console = stack.log.read_text()
    for name, precision in (("fp16", "fp16"), ("int8", "int8"), ("awq", "awq")):
        assert re.search(rf"\] engine {name} +ready: {precision}, (float16|bfloat16) activations", console), console
    assert "ready: serving 'demo-chat' at http://127.0.0.1:" in console
    assert "logs of Ray, the router and every engine: /" in console
    # One metrics address for every replica: this node's Ray metrics agent, on the configured port.
    assert f"metrics    http://127.0.0.1:{METRICS_PORT}/metrics (this node's Ray metrics agent)" in console
    for noise in ('{"asctime"', "Deployment Options", "Triton", "INFO", "Traceback"):
        assert noise not in console, f"{noise!r} on the console:\n{console}"


def test_the_hostile_bodies_get_no_5xx_from_the_real_stack(stack: Stack) -> None:
    # The unit tests' generated set (every field of both request models, each with wrong types, null,
    # negative, huge and numeric-string values), here through Ray Serve's proxy to real engines.
    statuses: list[int] = []
    with httpx.Client(base_url=BASE, headers={"authorization": "Bearer demo-premium"}, timeout=60) as http:
        for path, body in hostile_bodies():
            answer = http.post(path, json=body)
            statuses.append(answer.status_code)
            assert answer.status_code < 500, (path, body, answer.text[:300])
            if answer.status_code >= 400:
                assert set(answer.json()["error"]) == {"message", "type", "param", "code"}
    assert statuses.count(200) > 100  # and the well-formed ones were really answered by the engines


def test_errors_are_openai_shaped_with_the_right_status(stack: Stack) -> None:
    with pytest.raises(openai.AuthenticationError):
        client("not-a-key").chat.completions.create(model="demo-chat", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.NotFoundError):
        client("demo-batch").chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.PermissionDeniedError):
        client("demo-batch").chat.completions.create(
            model="demo-chat", messages=[{"role": "user", "content": "x"}], extra_headers={"x-variant": "fp16"}
        )
    with pytest.raises(openai.PermissionDeniedError, match="may not use awq"):
        client("test-premium-admin").chat.completions.create(
            model="demo-chat", messages=[{"role": "user", "content": "x"}], extra_headers={"x-variant": "awq"}
        )
    with pytest.raises(openai.BadRequestError, match="at most 4"):
        client("demo-batch").chat.completions.create(
            model="demo-chat", messages=[{"role": "user", "content": "x"}], n=9
        )
    with pytest.raises(openai.BadRequestError, match="maximum context length"):  # the engine's own check
        client("demo-batch").completions.create(model="demo-chat", prompt="word " * 3000, max_tokens=2)
    malformed = httpx.post(
        f"{BASE}/v1/chat/completions", content=b"{oops", headers={"authorization": "Bearer demo-batch"}
    )
    assert malformed.status_code == 400
    assert malformed.json()["error"]["code"] == "invalid_json"
    huge = httpx.post(
        f"{BASE}/v1/completions", content=b"x" * 2_000_000, headers={"authorization": "Bearer demo-batch"}
    )
    assert huge.status_code == 413


def test_admin_override_pins_the_variant(stack: Stack) -> None:
    raw = client("demo-admin").chat.completions.with_raw_response.create(
        model="demo-chat", messages=[{"role": "user", "content": "x"}], max_tokens=2, extra_headers={"x-variant": "awq"}
    )
    assert raw.headers["x-served-variant"] == "awq"


def test_64_concurrent_requests_all_succeed(stack: Stack) -> None:
    async def run() -> list[str]:
        async def one(i: int) -> str:
            api = openai.AsyncOpenAI(
                base_url=f"{BASE}/v1", api_key=list(TIER_VARIANTS)[i % 4], max_retries=0, timeout=300
            )
            raw = await api.chat.completions.with_raw_response.create(
                model="demo-chat", messages=[{"role": "user", "content": f"request {i}"}], max_tokens=8, user=f"u{i}"
            )
            return raw.headers["x-served-variant"]

        return await asyncio.gather(*(one(i) for i in range(64)))

    served = asyncio.run(run())
    assert len(served) == 64
    assert set(served) == {"fp16", "int8", "awq"}


def test_weights_change_under_load_with_zero_failed_requests(stack: Stack, configure: Configure) -> None:
    # Changes the standard tier's weight; the `configure` fixture restores the starting config afterwards.
    failures: list[str] = []
    successes = 0

    async def load(stop: asyncio.Event) -> None:
        nonlocal successes
        api = openai.AsyncOpenAI(base_url=f"{BASE}/v1", api_key="demo-standard", max_retries=0, timeout=300)

        async def worker(w: int) -> None:
            nonlocal successes
            i = 0
            while not stop.is_set():
                try:
                    await api.chat.completions.create(
                        model="demo-chat", messages=[{"role": "user", "content": "x"}], max_tokens=4, user=f"w{w}-{i}"
                    )
                    successes += 1
                except Exception as exc:  # any failure at all is what this test is about
                    failures.append(repr(exc))
                i += 1

        await asyncio.gather(*(worker(w) for w in range(16)))

    async def change_weights_under_load() -> None:
        stop = asyncio.Event()
        running = asyncio.create_task(load(stop))
        for weight in (0.0, 100.0, 50.0, None):
            wanted = successes + 10  # some answers under each config before the next change (and at the end)

            def answered(wanted: int = wanted) -> bool:
                return successes >= wanted or bool(failures)

            await poll_until_async(answered, "ten more answers", timeout_s=120)
            if weight is not None:
                done = await asyncio.to_thread(apply_config, stack, standard_weight=weight)
                assert done.returncode == 0, done.stderr
        stop.set()
        await running

    asyncio.run(change_weights_under_load())
    assert failures == []
    assert successes > 50

    # And the weights really took effect: 0 sends every user to the baseline, 100 to the candidate.
    configure(standard_weight=0.0)
    assert served_variants("demo-standard", range(30)) == {"fp16"}
    configure(standard_weight=100.0)
    assert served_variants("demo-standard", range(30)) == {"int8"}
