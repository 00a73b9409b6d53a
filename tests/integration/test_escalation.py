"""Escalation on the real stack: raising the standard tier's threshold on the mean token log-prob re-runs its
int8 answers on fp16, the answers say so, and the escalation counter moves by as many."""

from __future__ import annotations

import openai
import pytest

from tests.integration.conftest import BASE, Configure, Stack
from tests.integration.test_quality_signals import scrape, total

pytestmark = pytest.mark.integration

USERS = 20
NEVER = -1000.0  # no answer of a language model is this unsure: nothing is escalated
ALWAYS = 0.0  # every answer's mean log-prob is below 0: every int8 answer is escalated


def escalations() -> float:
    return total(scrape(), "ray_serving_overrides_total", tier="standard", kind="escalation")


def ask(api: openai.OpenAI) -> list[tuple[str, str | None, str | None]]:
    """(served variant, x-escalated, x-escalated-from) of one answer per user; no answer carries log-probs,
    which the router asked for and the client did not."""
    found = []
    for i in range(USERS):
        raw = api.chat.completions.with_raw_response.create(
            model="demo-chat",
            messages=[{"role": "user", "content": f"Tell me something about the number {i}"}],
            max_tokens=8,
            temperature=0,
            user=f"escalate-{i}",
        )
        assert raw.parse().choices[0].logprobs is None
        found.append(
            (raw.headers["x-served-variant"], raw.headers.get("x-escalated"), raw.headers.get("x-escalated-from"))
        )
    return found


def test_raising_the_threshold_raises_the_full_precision_share(stack: Stack, configure: Configure) -> None:
    api = openai.OpenAI(base_url=f"{BASE}/v1", api_key="demo-standard", max_retries=0, timeout=120)
    configure(standard_escalation=NEVER)
    start = escalations()
    low = ask(api)
    after_low = escalations()
    configure(standard_escalation=ALWAYS)
    high = ask(api)
    after_high = escalations()

    on_int8 = [i for i, (variant, _, _) in enumerate(low) if variant == "int8"]
    share_low = sum(variant == "fp16" for variant, _, _ in low) / USERS
    share_high = sum(variant == "fp16" for variant, _, _ in high) / USERS
    print(
        f"fp16 share of standard answers: threshold {NEVER} -> {share_low:.2f}, {ALWAYS} -> {share_high:.2f}; "
        f"escalations counted {after_low - start:.0f} then {after_high - after_low:.0f}"
    )
    assert len(on_int8) >= 3, low  # the sticky 50 % split put some users on int8
    assert all(escalated is None for _, escalated, _ in low)
    assert after_low == start
    # Every int8 answer was re-run on fp16 and says so; the fp16 users' answers are untouched.
    assert share_high == 1.0 > share_low
    assert [i for i, (_, escalated, _) in enumerate(high) if escalated == "true"] == on_int8
    assert {source for _, _, source in high if source is not None} == {"int8"}
    assert after_high - after_low == len(on_int8)


def test_an_escalated_completion_keeps_only_the_logprobs_the_client_asked_for(
    stack: Stack, configure: Configure
) -> None:
    configure(standard_escalation=ALWAYS)
    api = openai.OpenAI(base_url=f"{BASE}/v1", api_key="demo-standard", max_retries=0, timeout=120)
    for i in range(USERS):  # the first user routed to int8 (the split is sticky per user)
        user = f"escalate-{i}"
        raw = api.completions.with_raw_response.create(
            model="demo-chat", prompt="We the people", max_tokens=6, temperature=0, user=user
        )
        if raw.headers.get("x-escalated") == "true":
            break
    else:
        pytest.fail("no completion was escalated")
    assert raw.headers["x-served-variant"] == "fp16"
    assert raw.parse().choices[0].logprobs is None
    asked = api.completions.with_raw_response.create(
        model="demo-chat", prompt="We the people", max_tokens=6, temperature=0, user=user, logprobs=2
    )
    assert asked.headers["x-escalated"] == "true"
    completion = asked.parse()
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None
    assert completion.usage is not None
    assert len(logprobs.token_logprobs or []) == completion.usage.completion_tokens
    assert all(len(top) >= 2 for top in logprobs.top_logprobs or [])  # the sampled token may be a third
    # A streamed answer is on the wire before its confidence is known: never escalated.
    with api.completions.with_streaming_response.create(
        model="demo-chat", prompt="We the people", max_tokens=6, temperature=0, user=user, stream=True
    ) as streamed:
        assert streamed.headers["x-served-variant"] == "int8"
        assert "x-escalated" not in streamed.headers
        assert any(chunk.choices for chunk in streamed.parse())
