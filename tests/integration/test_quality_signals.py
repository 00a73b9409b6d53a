"""Shadowing and the quality signals on the real stack, read from Ray's metrics agent."""

from __future__ import annotations

import statistics
import time
from collections import defaultdict

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving.ops.launch import METRICS_REPORT_INTERVAL_MS
from tests.integration.conftest import BASE, METRICS_URL, Configure, Stack
from tests.polling import poll_until

pytestmark = pytest.mark.integration


def scrape() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample on this node's Ray metrics agent (both router replicas), once the last requests are in it:
    replicas hand their samples to the agent every METRICS_REPORT_INTERVAL_MS."""
    time.sleep(2 * METRICS_REPORT_INTERVAL_MS / 1000)
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(httpx.get(METRICS_URL, timeout=10).text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def total(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, found), v in samples.items() if n == name and want <= found)


def wait_for_shadows(expected_comparisons: float, timeout_s: float = 120) -> None:
    """Waits until this many shadow comparisons are done (compared or dropped); fails the test if they are not."""

    def done() -> float:
        samples = scrape()
        return total(samples, "ray_serving_shadow_comparisons_total") + total(
            samples, "ray_serving_shadow_dropped_total"
        )

    poll_until(
        lambda: done() >= expected_comparisons, f"{expected_comparisons:.0f} shadow comparisons", timeout_s=timeout_s
    )


def test_shadowing_does_not_delay_the_primary_answer(stack: Stack, configure: Configure) -> None:
    # Changes the shadow rate; the `configure` fixture restores the starting config afterwards.
    api = openai.OpenAI(base_url=f"{BASE}/v1", api_key="demo-batch", max_retries=0, timeout=120)

    def latencies(tag: str) -> list[float]:
        measured = []
        for i in range(20):
            started = time.perf_counter()
            api.chat.completions.create(
                model="demo-chat",
                messages=[{"role": "user", "content": f"We the people {i}"}],
                max_tokens=16,
                temperature=0,
                user=f"{tag}-{i}",
            )
            measured.append(time.perf_counter() - started)
            # Let any shadow work finish before the next request, so that what is measured is whether the
            # answer waits for its shadow, not the CPU the shadow takes from the next request.
            time.sleep(0.4)
        return measured

    configure(shadow_rate=0.0)
    without = latencies("off")
    configure(shadow_rate=1.0)
    before = total(scrape(), "ray_serving_shadow_comparisons_total")
    with_shadow = latencies("on")
    wait_for_shadows(before + 20)
    compared = total(scrape(), "ray_serving_shadow_comparisons_total") - before
    off, on = statistics.median(without), statistics.median(with_shadow)
    print(
        f"median primary latency: shadow rate 0.0 -> {off * 1000:.1f} ms, 1.0 -> {on * 1000:.1f} ms "
        f"(ratio {on / off:.2f}); {compared:.0f} pairs compared"
    )
    assert compared >= 10  # shadowing really happened
    # Each shadowed pair costs four engine calls; had the answer waited for them, the median would
    # at least double. Within noise on a shared 2-core machine: under 1.5x.
    assert on / off < 1.5


def test_awq_drifts_and_disagrees_more_than_int8(stack: Stack, configure: Configure) -> None:
    # Changes the shadow rate; the `configure` fixture restores the starting config afterwards.
    configure(shadow_rate=1.0)
    api = openai.OpenAI(base_url=f"{BASE}/v1", api_key="demo-batch", max_retries=0, timeout=120)
    before = scrape()
    served: dict[str, int] = defaultdict(int)
    for i in range(60):
        raw = api.chat.completions.with_raw_response.create(
            model="demo-chat",
            messages=[{"role": "user", "content": f"Four score and seven years ago {i}"}],
            max_tokens=16,
            temperature=0,
            user=f"drift-{i}",
        )
        served[raw.headers["x-served-variant"]] += 1
        time.sleep(0.3)
    wait_for_shadows(total(before, "ray_serving_shadow_comparisons_total") + 40)
    after = scrape()

    def signal(primary: str, name: str) -> float:
        labels = {"tier": "batch", "primary": primary, "shadow": "fp16", "kind": "candidate"}
        return total(after, name, **labels) - total(before, name, **labels)

    found = {}
    for primary in ("int8", "awq"):
        pairs = signal(primary, "ray_serving_shadow_comparisons_total")
        assert pairs >= 5, f"too few {primary} pairs: {pairs} (served {dict(served)})"
        found[primary] = {
            "pairs": pairs,
            "disagreement_rate": signal(primary, "ray_serving_shadow_disagreements_total") / pairs,
            "token_agreement": signal(primary, "ray_serving_token_agreement_ratio_sum")
            / signal(primary, "ray_serving_token_agreement_ratio_count"),
            "score_drift": signal(primary, "ray_serving_score_drift_sum")
            / signal(primary, "ray_serving_score_drift_count"),
        }
    print(f"against fp16: {found}")
    assert found["awq"]["score_drift"] > 1.5 * found["int8"]["score_drift"]
    assert found["awq"]["token_agreement"] < found["int8"]["token_agreement"]
    assert found["awq"]["disagreement_rate"] >= found["int8"]["disagreement_rate"]


def test_feedback_moves_the_override_counter_of_the_variant_that_answered(stack: Stack) -> None:
    api = openai.OpenAI(base_url=f"{BASE}/v1", api_key="demo-batch", max_retries=0, timeout=120)
    raw = api.chat.completions.with_raw_response.create(
        model="demo-chat", messages=[{"role": "user", "content": "Is this right?"}], max_tokens=4, user="fb"
    )
    variant, response_id = raw.headers["x-served-variant"], raw.parse().id
    labels = {"variant": variant, "tier": "batch", "kind": "feedback"}
    before = total(scrape(), "ray_serving_overrides_total", **labels)
    answer = httpx.post(
        f"{BASE}/v1/feedback",
        json={"response_id": response_id, "overridden": True, "label": "no"},
        headers={"authorization": "Bearer demo-batch"},
    )
    assert answer.status_code == 200, answer.text
    assert total(scrape(), "ray_serving_overrides_total", **labels) == before + 1
    again = httpx.post(
        f"{BASE}/v1/feedback",
        json={"response_id": response_id, "overridden": True},
        headers={"authorization": "Bearer demo-batch"},
    )
    assert (again.status_code, again.json()["error"]["code"]) == (409, "duplicate")
    assert total(scrape(), "ray_serving_overrides_total", **labels) == before + 1  # one vote per answer
    other_tenant = httpx.post(
        f"{BASE}/v1/feedback",
        json={"response_id": response_id, "overridden": True},
        headers={"authorization": "Bearer test-premium-admin"},
    )
    assert other_tenant.status_code == 403
    unknown = httpx.post(
        f"{BASE}/v1/feedback",
        json={"response_id": "chatcmpl-unknown", "overridden": True},
        headers={"authorization": "Bearer demo-batch"},
    )
    assert unknown.status_code == 400  # not an id this server signed
