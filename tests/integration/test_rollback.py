"""Automatic rollback on the real stack: the awq candidate of the batch tier trips on its quality
signals and rolls back by itself, the int8 candidate of the standard tier does not, and the rollback
survives a router restart and a controller restart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import BASE, METRICS_URL, Stack, apply_config, served_variants

pytestmark = pytest.mark.integration

ADMIN = {"authorization": "Bearer demo-admin"}


def rollout() -> dict[str, Any]:
    answer = httpx.get(f"{BASE}/admin/rollout", headers=ADMIN, timeout=30)
    answer.raise_for_status()
    status: dict[str, Any] = answer.json()
    return status


def batch_variants(users: range) -> set[str]:
    return served_variants("demo-batch", users, prefix="after")


def exported(name: str, **labels: str) -> float:
    """The sum of a metric's samples on this node's Ray metrics agent, over every process that reports."""
    want = set(labels.items())
    return sum(
        sample.value
        for family in text_string_to_metric_families(httpx.get(METRICS_URL, timeout=10).text)
        for sample in family.samples
        if sample.name == name and want <= set(sample.labels.items())
    )


def kill(process_title: str) -> None:
    pids = subprocess.run(["pgrep", "-f", process_title], capture_output=True, text=True).stdout.split()
    assert pids, f"no process {process_title!r}"
    for pid in pids:
        os.kill(int(pid), signal.SIGKILL)


def wait_until(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except (httpx.HTTPError, KeyError):
            pass
        time.sleep(1)
    pytest.fail(f"{what} did not happen within {timeout_s} s")


def test_awq_rolls_back_by_itself_int8_does_not_and_it_stays_rolled_back(stack: Stack) -> None:
    # A changed tier config starts a fresh judgement of both candidates, with rollback on.
    assert apply_config(stack, shadow_rate=1.0, rollback=True, batch_weight=50.5, standard_weight=50.5).returncode == 0
    assert httpx.get(f"{BASE}/admin/rollout", headers={"authorization": "Bearer demo-batch"}).status_code == 403

    clients = {
        key: openai.OpenAI(base_url=f"{BASE}/v1", api_key=key, max_retries=0, timeout=120)
        for key in ("demo-batch", "demo-standard")
    }
    deadline = time.monotonic() + 420
    i = 0
    status = rollout()
    while time.monotonic() < deadline:
        for api in clients.values():
            api.chat.completions.create(
                model="demo-chat",
                messages=[{"role": "user", "content": f"When in the Course {i}"}],
                max_tokens=16,
                temperature=0,
                user=f"roll-{i}",
            )
        i += 1
        if i % 10 == 0:
            status = rollout()
            standard_judged = any(
                c["check"] == "score_drift" and c["value"] is not None for c in status["tiers"]["standard"]["checks"]
            )
            if status["tiers"]["batch"]["phase"] == "rolled_back" and standard_judged:
                break
        time.sleep(0.2)
    batch, standard = status["tiers"]["batch"], status["tiers"]["standard"]
    assert batch["phase"] == "rolled_back", batch
    assert batch["live_weight"] == 0.0
    event = batch["history"][-1]
    assert event["candidate"] == "awq"
    assert "score_drift" in event["reasons"]
    assert event["values"]["score_drift"] > event["thresholds"]["score_drift"]
    # The int8 candidate was judged on enough samples and passed every check.
    assert standard["phase"] == "progressing", standard
    assert standard["live_weight"] == 50.5
    drift = next(c for c in standard["checks"] if c["check"] == "score_drift")
    assert drift["value"] is not None
    assert not any(c["failed"] for c in standard["checks"])

    # Weight 0 reached the router quickly after the failing evaluation.
    delay = status["router"]["weights_changed_at"]["batch"] - event["at"]
    print(
        f"rollback: {event['reasons']} values {event['values']}; failing evaluation to router weight 0: "
        f"{delay:.2f} s (judged every {status['interval_s']} s); standard checks: "
        f"{[(c['check'], c['value']) for c in standard['checks']]}"
    )
    assert delay < 10
    assert batch_variants(range(20)) == {"int8"}
    # Counted once, by the controller, not once per router replica.
    for reason in event["reasons"]:
        wait_until(lambda r=reason: exported("ray_serving_rollbacks_total", tier="batch", reason=r) >= 1, 30, "export")
        assert exported("ray_serving_rollbacks_total", tier="batch", reason=reason) == 1

    # So does `serving rollout status`, as a table, and the state file.
    table = subprocess.run(
        [sys.executable, "-m", "serving.cli", "rollout", "status"], capture_output=True, text=True, check=True
    ).stdout
    assert any(line.split()[:2] == ["batch", "rolled_back"] for line in table.splitlines())
    assert "rolled back:" in table
    state = (stack.config.parent / "rollout-state.json").read_text()
    assert '"rolled_back"' in state
    assert "score_drift" in state

    # A router restart does not bring the weight back.
    kill("ServeReplica:serving:Router")
    wait_until(
        lambda: httpx.get(f"{BASE}/health", timeout=5).status_code == 200 and rollout()["router"]["live_weights"],
        180,
        "the router restart",
    )
    assert rollout()["tiers"]["batch"]["live_weight"] == 0.0
    assert batch_variants(range(20)) == {"int8"}

    # Nor does a controller restart: it comes back from the state file.
    kill("RolloutController")
    time.sleep(3)
    wait_until(lambda: rollout()["tiers"]["batch"]["phase"] == "rolled_back", 120, "the controller restart")
    assert rollout()["tiers"]["batch"]["live_weight"] == 0.0
    assert batch_variants(range(20)) == {"int8"}

    # Re-applying the same config keeps it rolled back; an operator's changed tier config re-enables it.
    assert apply_config(stack, shadow_rate=1.0, rollback=True, batch_weight=50.5, standard_weight=50.5).returncode == 0
    assert rollout()["tiers"]["batch"]["live_weight"] == 0.0
    assert apply_config(stack, batch_weight=50.0).returncode == 0
    assert rollout()["tiers"]["batch"]["phase"] == "progressing"
    assert "awq" in batch_variants(range(40))


def test_routers_start_a_new_controller_when_theirs_died_for_good(stack: Stack) -> None:
    """A controller that Ray will not restart (as after a failure in its constructor): routers find, or
    start, a new one, which takes the last applied config from the state file."""
    import ray

    from serving.rollout.controller import NAMESPACE, controller

    assert apply_config(stack, batch_weight=42.0).returncode == 0
    version = httpx.get(f"{BASE}/health", timeout=5).json()["config_version"]
    ray.init(address="auto", namespace=NAMESPACE, log_to_driver=False)
    try:
        old = controller()
        ray.kill(old, no_restart=True)
        wait_until(lambda: rollout()["config_version"] == version, 60, "a new controller")
        assert rollout()["tiers"]["batch"]["configured_weight"] == 42.0  # the applied config, not the deployed one
    finally:
        ray.shutdown()
        apply_config(stack, batch_weight=50.0)  # restores the demo weight for the tests after this one
