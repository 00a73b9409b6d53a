"""A real Prometheus server (Debian's package) scrapes the running stack through Ray's metrics agent on
this node (the stack's observability.metrics_port): every metric of the metrics contract must be there,
with data, and a request is counted once whichever router replica served it."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.integration.conftest import (
    BASE,
    ROUTER_REPLICAS,
    Configure,
    Stack,
)
from tests.polling import poll_until

pytestmark = pytest.mark.integration

CONTRACT = [
    "ray_serving_request_duration_seconds_bucket",
    "ray_serving_time_to_first_token_seconds_bucket",
    "ray_serving_time_per_output_token_seconds_bucket",
    "ray_serving_requests_total",
    "ray_serving_tokens_total",
    "ray_serving_shadow_comparisons_total",
    "ray_serving_shadow_disagreements_total",
    "ray_serving_token_agreement_ratio_bucket",
    "ray_serving_score_drift_bucket",
    "ray_serving_overrides_total",
    "ray_serving_feedback_total",
    "ray_serving_shadow_dropped_total",
    # The rollout controller's own, emitted once by it (not by the routers); its counters start at 0.
    "ray_serving_canary_weight_percent",
    "ray_serving_rollout_fail_safe",
    "ray_serving_rollout_last_evaluation_timestamp_seconds",
    "ray_serving_rollout_phase",
    "ray_serving_rollbacks_total",
    "ray_serving_promotions_total",
]


def query(url: str, promql: str) -> list[dict[str, object]]:
    answer = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=10).json()
    assert answer["status"] == "success", answer
    result: list[dict[str, object]] = answer["data"]["result"]
    return result


def test_prometheus_scrapes_every_metric_of_the_contract(stack: Stack, prometheus: str, configure: Configure) -> None:
    configure(shadow_rate=1.0)  # every answer shadowed; the `configure` fixture restores the starting config after
    batch = openai.OpenAI(base_url=f"{BASE}/v1", api_key="demo-batch", max_retries=0, timeout=120)
    for i in range(8):
        batch.chat.completions.create(
            model="demo-chat", messages=[{"role": "user", "content": f"Prometheus {i}"}], max_tokens=8, user=f"p{i}"
        )
    for i in range(2):  # time to first token and per output token are measured on streamed answers
        stream = batch.chat.completions.create(
            model="demo-chat",
            messages=[{"role": "user", "content": f"Stream {i}"}],
            max_tokens=8,
            stream=True,
            extra_body={"min_tokens": 8},  # several tokens, so there is a time per token after the first
        )
        assert len([chunk for chunk in stream if chunk.choices]) >= 1
    admin = openai.OpenAI(base_url=f"{BASE}/v1", api_key="demo-admin", max_retries=0, timeout=120)
    pinned = admin.chat.completions.create(
        model="demo-chat",
        messages=[{"role": "user", "content": "pinned"}],
        max_tokens=4,
        extra_headers={"x-variant": "awq"},
    )
    httpx.post(
        f"{BASE}/v1/feedback",
        json={"response_id": pinned.id, "overridden": True},
        headers={"authorization": "Bearer demo-admin"},
    ).raise_for_status()

    def missing() -> list[str]:
        return [name for name in CONTRACT if not query(prometheus, name)]

    poll_until(lambda: not missing(), "every metric of the contract in Prometheus", timeout_s=90, interval_s=2)
    # The canary weight is the rollout controller's, published once, not mirrored by every router replica
    # (whose own series carry Serve's deployment label).
    assert query(prometheus, 'ray_serving_shadow_dropped_total{deployment="Router"}')
    assert query(prometheus, 'ray_serving_canary_weight_percent{deployment="Router"}') == []
    assert query(prometheus, 'up{job="serving"} == 1')
    kinds = {r["metric"]["kind"] for r in query(prometheus, "ray_serving_overrides_total")}  # type: ignore[index]
    assert kinds >= {"routing", "feedback"}
    # The documented reading of a ratio works on the real data: disagreement rate over the comparisons.
    assert query(prometheus, "sum(ray_serving_shadow_disagreements_total) / sum(ray_serving_shadow_comparisons_total)")


def per_replica(url: str, promql: str) -> dict[str, float]:
    return {r["metric"]["replica"]: float(r["value"][1]) for r in query(url, promql)}  # type: ignore[index]


def test_every_request_is_counted_once_whichever_router_replica_served_it(stack: Stack, prometheus: str) -> None:
    served = 'sum by (replica) (ray_serving_requests_total{tier="premium", role="primary", deployment="Router"})'
    time.sleep(3)  # what earlier tests sent is exported (1 s) and scraped (1 s) before counting starts
    before = per_replica(prometheus, served)
    sent = 40
    premium = openai.OpenAI(base_url=f"{BASE}/v1", api_key="demo-premium", max_retries=0, timeout=120)
    for i in range(sent):
        premium.chat.completions.create(
            model="demo-chat", messages=[{"role": "user", "content": f"count {i}"}], max_tokens=1, user=f"c{i}"
        )

    def counted() -> dict[str, float]:
        after = per_replica(prometheus, served)
        return {replica: after[replica] - before.get(replica, 0.0) for replica in after}

    poll_until(lambda: sum(counted().values()) >= sent, f"{sent} requests counted in Prometheus", interval_s=1)
    time.sleep(3)  # a check that nothing more arrives (no request counted twice): an absence has no event to await
    by_replica = counted()
    assert sum(by_replica.values()) == sent, by_replica
    # Ray Serve spread the requests over the replicas (all 40 on one: about 1 in 2**39), and each one's
    # metrics reached Prometheus through the one metrics address.
    assert len([n for n in by_replica.values() if n > 0]) == ROUTER_REPLICAS, by_replica
