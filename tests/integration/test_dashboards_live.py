"""Every panel of every committed dashboard, on real data: after traffic through the real stack (shadowed,
a routing override, a feedback override, a rejected request, a burst, an automatic rollback of the awq
candidate, an engine replica killed mid-answer and a promotion of int8), each panel's every query runs
against the real Prometheus over the test's time range, as Grafana would send it, and none may fail or come
back empty; nor may an annotation mark no event. Every alert rule's expression evaluates, and every series
an alert reads exists.

With SERVING_PREVIEWS_DIR set, the previews drawn from this run are written there (deploy/grafana/previews/
holds the committed ones, from this test)."""

from __future__ import annotations

import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from serving.dashboards import build, preview
from tests.chaos import kill, replica
from tests.integration.conftest import BASE, REPO, Stack, apply_config
from tests.polling import poll_until

pytestmark = pytest.mark.integration

ADMIN = {"authorization": "Bearer demo-admin"}
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"


def client(key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{BASE}/v1", api_key=key, max_retries=0, timeout=120)


def ask(api: openai.OpenAI, i: int, *, stream: bool, temperature: float = 0.0, **extra: Any) -> None:
    """One chat request from user `i`; a streamed one is read to the end (its first token is then measured)."""
    answer = api.chat.completions.create(
        model="demo-chat",
        messages=[{"role": "user", "content": f"When in the Course of human events {i}"}],
        max_tokens=12,
        temperature=temperature,
        user=f"panel-{i}",
        stream=stream,
        **extra,
    )
    if stream:
        for _ in answer:
            pass


def batch_phase() -> str:
    status = httpx.get(f"{BASE}/admin/rollout", headers=ADMIN, timeout=30).json()
    phase: str = status["tiers"]["batch"]["phase"]
    return phase


def drive_until_the_batch_candidate_rolls_back(timeout_s: float) -> None:
    """Shadowed traffic on the standard and batch tiers (whole and streamed answers) until awq rolls back,
    and premium streams that ask for several tokens (a time per output token after the first)."""
    apis = [client("demo-standard"), client("demo-batch")]
    premium = client("demo-premium")
    deadline = time.monotonic() + timeout_s
    i = 0
    while time.monotonic() < deadline:
        for api in apis:
            ask(api, i, stream=i % 2 == 1)
        if i % 5 == 0:
            ask(premium, i, stream=True, extra_body={"min_tokens": 6})
        i += 1
        if i % 10 == 0 and batch_phase() == "rolled_back":
            return
    pytest.fail(f"the awq candidate did not roll back within {timeout_s} s ({i} rounds of traffic)")


def trigger_events() -> None:
    """What makes the event-only series exist: a routing override, a feedback override on its answer, a
    request the engine rejects (a prompt longer than its context), and a burst that fills the engines."""
    admin = client("demo-admin")
    pinned = admin.chat.completions.create(
        model="demo-chat",
        messages=[{"role": "user", "content": "pinned"}],
        max_tokens=4,
        extra_headers={"x-variant": "awq"},
    )
    httpx.post(
        f"{BASE}/v1/feedback", json={"response_id": pinned.id, "overridden": True}, headers=ADMIN, timeout=30
    ).raise_for_status()
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client("demo-batch").completions.create(model="demo-chat", prompt="word " * 3000, max_tokens=2)
    standard = client("demo-standard")
    with ThreadPoolExecutor(max_workers=12) as pool:
        list(pool.map(lambda i: ask(standard, 10_000 + i, stream=True), range(24)))


def fail_an_engine_mid_stream() -> None:
    """A real engine failure: the awq replica is killed through Ray's API while it streams a long answer. Rolled
    back by now, awq gets only this pinned request, and Serve starts a new replica while the test goes on (about
    25 s here; the test waits for it at the end). The client sees the router's error event, and the router
    counts an error of awq."""
    engine = replica("variant-awq")  # looked up first: the kill must land within the answer (~3 s of tokens)
    stream = client("demo-admin").chat.completions.create(
        model="demo-chat",
        messages=[{"role": "user", "content": "cut short"}],
        max_tokens=500,
        extra_body={"min_tokens": 500},
        extra_headers={"x-variant": "awq"},
        stream=True,
    )
    chunks = iter(stream)
    next(chunks)  # the engine is generating
    kill(engine)
    with pytest.raises(openai.APIError, match="failed during the answer"):  # the router's error event
        list(chunks)


def ready() -> bool:
    """Whether every variant generates (each router replica checks at most every 5 s)."""
    return httpx.get(f"{BASE}/ready", timeout=60).status_code == 200


def drive_until_the_noise_floor_disagrees(prometheus: str, timeout_s: float) -> None:
    """A variant paired with itself disagrees only when sampling is random: sampled answers (temperature 1)
    on the batch tier, which is rolled back, so no judgement can change, until one noise-floor comparison
    disagreed (a tenth of the shadows are noise-floor pairs)."""
    batch = client("demo-batch")
    deadline = time.monotonic() + timeout_s
    i = 0
    while not instant(prometheus, 'ray_serving_shadow_disagreements_total{kind="noise_floor"}'):
        assert time.monotonic() < deadline, f"no noise-floor disagreement within {timeout_s} s ({i} requests)"
        ask(batch, 20_000 + i, stream=False, temperature=1.0)
        i += 1


def instant(url: str, promql: str) -> list[dict[str, Any]]:
    answer = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=30).json()
    assert answer["status"] == "success", (promql, answer)
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def wait_for_scrape(url: str, promql: str, timeout_s: float = 30) -> None:
    """Until Prometheus holds what the last request changed (exported every second, scraped every second)."""
    deadline = time.monotonic() + timeout_s
    while not instant(url, promql):
        assert time.monotonic() < deadline, f"Prometheus never returned {promql}"
        time.sleep(1)


def alert_selectors(expr: str) -> list[str]:
    """The series selectors an alert expression reads (metric name with its label matchers)."""
    return [m.group(0) for m in re.finditer(r"\b(?:ray_[a-z_]+|up)\b(?:\{[^}]*\})?", expr)]


def test_every_dashboard_query_and_alert_expression_returns_data(
    stack: Stack, prometheus: str, ray_driver: None, tmp_path: Path
) -> None:
    start = time.time()
    # A changed tier config starts a fresh judgement, with every answer shadowed and rollback on.
    settings = {"shadow_rate": 1.0, "rollback": True, "batch_weight": 50.7}
    assert apply_config(stack, **settings, standard_weight=50.7).returncode == 0
    try:
        drive_until_the_batch_candidate_rolls_back(timeout_s=180)
        trigger_events()
        fail_an_engine_mid_stream()
        drive_until_the_noise_floor_disagrees(prometheus, timeout_s=90)
        # A promotion: the operator gives the standard tier's int8 all of its traffic (the batch tier is
        # unchanged, so it stays rolled back).
        assert apply_config(stack, **settings, standard_weight=100.0).returncode == 0
        wait_for_scrape(prometheus, 'ray_serving_rollout_phase{tier="standard", phase="promoted"} == 1')
        wait_for_scrape(prometheus, 'ray_serving_overrides_total{kind="feedback"}')
        wait_for_scrape(prometheus, 'ray_serving_requests_total{outcome="rejected"}')
        wait_for_scrape(prometheus, 'ray_serving_requests_total{variant="awq", role="primary", outcome="error"}')
        wait_for_scrape(prometheus, 'ray_serving_rollout_phase{tier="batch", phase="rolled_back"} == 1')
        time.sleep(3)  # the burst's last answers and shadows are exported and scraped too
        end = time.time()

        out = Path(os.environ.get("SERVING_PREVIEWS_DIR") or tmp_path)
        problems: list[str] = []
        for name in build.DASHBOARDS:
            data = json.loads((build.OUT / f"{name}.json").read_text())
            report = preview.render(data, preview.prometheus(prometheus), start, end, out / f"{name}.png")
            print("\n".join(report.lines()))
            problems += [f"{name}: {p.title}: {error}" for p in report.panels for error in p.errors]
            problems += [f"{name}: no data: {query}" for query in report.empty_queries]
            problems += [
                f"{name}: annotation {annotation} marked no event"
                for annotation, events in report.annotations.items()
                if not events
            ]
        for group in yaml.safe_load(ALERTS.read_text())["groups"]:
            for rule in group["rules"]:
                instant(prometheus, rule["expr"])  # evaluates without error (firing or not)
                problems += [
                    f"alert {rule['alert']}: no series {selector}"
                    for selector in alert_selectors(rule["expr"])
                    if not instant(prometheus, selector)
                ]
        assert problems == []
    finally:
        poll_until(ready, "the killed awq replica back and every engine ready", timeout_s=300)
        assert apply_config(stack).returncode == 0  # the demo weights: a changed tier re-enables awq
        assert batch_phase() == "progressing"
