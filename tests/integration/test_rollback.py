"""Automatic rollback on the real stack, under mixed traffic on every tier, with the rollout controller
killed once and the fp16 engine replica killed once in between (both through Ray's API, by handle): the
awq candidate of the batch tier, in a progression, trips on its quality signals and rolls back by itself
mid-progression, the int8 candidate of the standard tier never does, and the restarted fp16 replica's
first seconds are left out of the latency checks; the rollback reaches every router, is counted once and
survives router and controller restarts. One run of traffic (the module's `judged` fixture) feeds the tests
after it, one behaviour each; they run in file order, and the last ones restore the demo config."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import yaml

from serving.config import ProgressionConfig
from tests.chaos import kill_controller, kill_replica, replicas
from tests.integration.conftest import BASE, Stack, apply_config, exported, served_variants
from tests.polling import poll_until

pytestmark = pytest.mark.integration

ADMIN = {"authorization": "Bearer demo-admin"}
# awq on batch steps up while its checks pass, slowly enough that its quality signals roll it back long
# before a promotion (5 passing intervals, 100 s), at whatever step it has reached.
BATCH_PROGRESSION = ProgressionConfig(step_weight=10.0, max_weight=90.5, interval_s=20.0)
JUDGED = {"shadow_rate": 1.0, "rollback": True, "batch_weight": 50.5, "standard_weight": 50.5}


def rollout() -> dict[str, Any]:
    answer = httpx.get(f"{BASE}/admin/rollout", headers=ADMIN, timeout=30)
    answer.raise_for_status()
    status: dict[str, Any] = answer.json()
    return status


def batch_variants(users: range) -> set[str]:
    return served_variants("demo-batch", users, prefix="after")


def wait_until(condition: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """`poll_until`, reading an error of something not there yet (a controller restarting, a first save)
    as not yet."""

    def attempt() -> Any:
        try:
            return condition()
        except (httpx.HTTPError, KeyError, StopIteration, OSError):
            return None

    return poll_until(attempt, what, timeout_s=timeout_s)


def check(status: dict[str, Any], tier: str, name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(c for c in status["tiers"][tier]["checks"] if c["check"] == name)
    return found


@dataclass
class Traffic:
    """Requests from every tier's key, from a thread, until stopped; failures (an engine restarting)
    are counted, not raised. `paused` holds it while set."""

    keys: tuple[str, ...] = ("demo-premium", "demo-standard", "demo-batch")
    outcomes: Counter[int] = field(default_factory=Counter)
    stop: threading.Event = field(default_factory=threading.Event)
    paused: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        i = 0
        with httpx.Client(base_url=BASE, timeout=120) as http:
            while not self.stop.is_set():
                if self.paused.is_set():
                    self.stop.wait(0.1)
                    continue
                for key in self.keys:
                    body = {
                        "model": "demo-chat",
                        "messages": [{"role": "user", "content": f"When in the Course {i}"}],
                        "max_tokens": 16,
                        "temperature": 0,
                        "user": f"roll-{i}",
                    }
                    try:
                        answer = http.post(
                            "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}
                        )
                        self.outcomes[answer.status_code] += 1
                    except httpx.HTTPError:
                        self.outcomes[0] += 1
                i += 1


@contextmanager
def traffic(keys: tuple[str, ...] = Traffic.keys) -> Iterator[Traffic]:
    running = Traffic(keys)
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    try:
        yield running
    finally:
        running.stop.set()
        thread.join(timeout=150)


def saved_comparisons(stack: Stack, tier: str, candidate: str) -> int:
    """The comparisons of a tier's candidate in the controller's saved window, since its tier config
    began (what its score_drift check counts)."""
    folder = stack.config.parent
    since = json.loads((folder / "rollout-state.json").read_text())["tiers"][tier]["since"]
    window = json.loads((folder / "rollout-state.json.window").read_text())
    return sum(
        1
        for at, e in window["events"]
        if at >= since
        and e["type"] == "ComparisonSignal"
        and (e["tier"], e["primary"]) == (tier, candidate)
        and e["pair"] != "noise_floor"
        and e["drift"] is not None
    )


@dataclass
class Judged:
    status: dict[str, Any]  # when awq was rolled back and int8 judged
    fp16_killed_at: float
    saved: int  # int8's comparisons saved in the window when the controller was killed
    resumed: int  # those its restarted run judged first
    outcomes: Counter[int]


@pytest.fixture(scope="module")
def judged(stack: Stack, ray_driver: None) -> Judged:
    # A changed tier config starts a fresh judgement of both candidates, with rollback on.
    assert apply_config(stack, **JUDGED, batch_progression=BATCH_PROGRESSION).returncode == 0
    with traffic() as running:
        wait_until(lambda: check(rollout(), "standard", "score_drift")["samples"] >= 10, 300, "10 int8 comparisons")
        # The controller is killed with its window saved: traffic holds until the save has every comparison
        # it judged, so that what its restarted run judges first can be compared with what it had.
        running.paused.set()
        saved = wait_until(
            lambda: (
                (n := check(rollout(), "standard", "score_drift")["samples"])
                and saved_comparisons(stack, "standard", "int8") >= n
                and n
            ),
            60,
            "the window saved",
        )
        kill_controller()
        resumed = wait_until(
            lambda: check(rollout(), "standard", "score_drift")["samples"],
            120,
            "a judgement by the restarted controller",
        )
        running.paused.clear()
        fp16_killed_at = time.time()
        kill_replica("variant-fp16")  # the baseline of premium and standard, and the shadows' target
        status = wait_until(
            lambda: (
                (s := rollout())["tiers"]["batch"]["phase"] == "rolled_back"
                and check(s, "standard", "score_drift")["value"] is not None
                and httpx.get(f"{BASE}/ready", timeout=30).status_code == 200
                and fp16_warm_ups(s, fp16_killed_at)
                and fp16_warm_ups(s, fp16_killed_at)[0]["samples"] > 0
                and s
            ),
            420,
            "awq rolled back, int8 judged, every engine back and the new fp16 replica's first answers left out",
        )
    return Judged(status, fp16_killed_at, saved, resumed, running.outcomes)


def fp16_warm_ups(status: dict[str, Any], after: float) -> list[dict[str, Any]]:
    """The starts of fp16 replicas after `after` that the controller's last judgement of standard saw."""
    return [u for u in status["tiers"]["standard"]["left_out"] if u["variant"] == "fp16" and u["start"] >= after]


def test_awq_on_batch_rolls_back_by_itself_mid_progression_on_its_quality_signals(judged: Judged) -> None:
    batch = judged.status["tiers"]["batch"]
    assert batch["phase"] == "rolled_back", batch
    assert batch["live_weight"] == 0.0
    assert batch["progression"] == BATCH_PROGRESSION.model_dump()
    event = batch["history"][-1]
    assert (event["kind"], event["candidate"], event["by"]) == ("rollback", "awq", "controller")
    assert event["phase_before"] == "progressing"  # progressing -> rolled_back, at whatever step it was
    steps = [e for e in batch["history"] if e["kind"] == "step" and e["at"] >= event["since"]]
    assert event["weight_before"] == (steps[-1]["weight_after"] if steps else 50.5)
    print(f"awq rolled back at {event['weight_before']:g}% after {len(steps)} steps: {event['reasons']}")
    assert "score_drift" in event["reasons"]
    assert event["values"]["score_drift"] > event["thresholds"]["score_drift"]


def test_the_restarted_fp16_replica_is_left_out_of_the_latency_checks(judged: Judged) -> None:
    """The killed replica's successor told the controller it started; its variant's latency samples of the
    next `warmup_exclusion_s` were left out of standard's checks (fp16 is its baseline)."""
    warm_ups = fp16_warm_ups(judged.status, judged.fp16_killed_at)
    assert len(warm_ups) == 1, warm_ups
    print(f"the new fp16 replica's first seconds: {warm_ups[0]}")
    assert warm_ups[0]["samples"] > 0
    assert warm_ups[0]["until"] - warm_ups[0]["start"] >= 30.0


def test_int8_on_standard_is_judged_and_never_rolled_back(judged: Judged) -> None:
    standard = judged.status["tiers"]["standard"]
    assert standard["phase"] == "progressing", standard
    assert standard["live_weight"] == 50.5
    assert check(judged.status, "standard", "score_drift")["value"] is not None
    assert not any(c["failed"] for c in standard["checks"])
    assert not [e for e in standard["history"] if e.get("kind", "rollback") == "rollback"]
    print(f"traffic outcomes across the kills: {dict(judged.outcomes)}")
    assert judged.outcomes[200] > 0


def test_a_controller_killed_under_traffic_resumes_judging_its_window(judged: Judged) -> None:
    assert judged.saved >= 10
    assert judged.resumed >= judged.saved  # not a fresh window: where it was
    assert check(judged.status, "standard", "score_drift")["samples"] > judged.resumed  # and signals kept coming


def test_the_rollback_reaches_every_router_within_seconds(judged: Judged) -> None:
    event = judged.status["tiers"]["batch"]["history"][-1]
    delay = judged.status["router"]["weights_changed_at"]["batch"] - event["at"]
    print(f"rollback: {event['reasons']} values {event['values']}; to router weight 0: {delay:.2f} s")
    assert delay < 10
    assert batch_variants(range(20)) == {"int8"}


def test_the_rollback_is_counted_once_not_once_per_router_replica(judged: Judged) -> None:
    history = judged.status["tiers"]["batch"]["history"]
    reasons = history[-1]["reasons"]
    # The session's stack may have rolled batch back before (the every-panel test does): the counter holds
    # every rollback the history holds, once each. The old per-replica mirror counted each one once per router
    # replica (twice here); a restarted controller's new process starts from 0 beside its predecessor's last
    # sample, which Ray's agent may keep or drop, so at most the history's count, at least this rollback.
    recorded = {
        r: sum(r in e.get("reasons", []) for e in history if e.get("kind", "rollback") == "rollback") for r in reasons
    }

    def counted() -> dict[str, float]:
        return {r: exported("ray_serving_rollbacks_total", tier="batch", reason=r) for r in reasons}

    wait_until(lambda: all(counted().values()), 30, "the rollback exported")
    for reason, count in counted().items():
        assert 1 <= count <= recorded[reason], (reason, count, recorded)


def test_rollout_status_and_the_state_file_show_the_rollback(stack: Stack, judged: Judged) -> None:
    table = subprocess.run(
        [sys.executable, "-m", "serving.ops.cli", "rollout", "status"], capture_output=True, text=True, check=True
    ).stdout
    assert any(line.split()[:2] == ["batch", "rolled_back"] for line in table.splitlines())
    assert "rolled back:" in table
    state = (stack.config.parent / "rollout-state.json").read_text()
    assert '"rolled_back"' in state
    assert "score_drift" in state


def test_a_router_replica_restart_does_not_bring_the_weight_back(judged: Judged) -> None:
    before = replicas("Router")
    kill_replica("Router")
    wait_until(
        lambda: len(replicas("Router")) == len(before) != 0 and replicas("Router") != before, 180, "a new router"
    )
    wait_until(lambda: httpx.get(f"{BASE}/ready", timeout=30).status_code == 200, 120, "the stack ready")
    assert rollout()["tiers"]["batch"]["live_weight"] == 0.0
    assert batch_variants(range(20)) == {"int8"}


def test_a_controller_restart_does_not_bring_the_weight_back(judged: Judged) -> None:
    kill_controller()
    wait_until(lambda: rollout()["tiers"]["batch"]["phase"] == "rolled_back", 120, "the controller restart")
    assert rollout()["tiers"]["batch"]["live_weight"] == 0.0
    assert batch_variants(range(20)) == {"int8"}


def test_the_same_config_keeps_it_rolled_back_a_changed_one_reenables_it(stack: Stack, judged: Judged) -> None:
    assert apply_config(stack, **JUDGED, batch_progression=BATCH_PROGRESSION).returncode == 0
    assert rollout()["tiers"]["batch"]["live_weight"] == 0.0
    assert apply_config(stack, batch_weight=50.0).returncode == 0  # also restores the demo config
    assert rollout()["tiers"]["batch"]["phase"] == "progressing"
    assert "awq" in batch_variants(range(40))


def test_routers_start_a_new_controller_when_theirs_died_for_good(stack: Stack, ray_driver: None) -> None:
    """A controller that Ray will not restart (as after a failure in its constructor): routers find, or
    start, a new one, which takes the last applied config from the state file."""
    import ray

    from serving.rollout.controller import controller

    assert apply_config(stack, batch_weight=42.0).returncode == 0
    version = httpx.get(f"{BASE}/health", timeout=5).json()["config_version"]
    try:
        ray.kill(controller(), no_restart=True)
        wait_until(lambda: rollout()["config_version"] == version, 60, "a new controller")
        assert rollout()["tiers"]["batch"]["configured_weight"] == 42.0  # the applied config, not the deployed one
    finally:
        apply_config(stack, batch_weight=50.0)  # restores the demo weight for the tests after this one


def test_a_progression_steps_int8_up_to_promoted(stack: Stack, ray_driver: None) -> None:
    """standard with `progression`: 25 % -> 50 % -> 75 % -> promoted while every check passes, each step
    in `serving rollout status`, the promotion in the controller's metrics. Restores the demo config."""
    data = yaml.safe_load(stack.config.read_text())
    data["tiers"]["standard"].update(
        weight=25.0, progression={"step_weight": 25.0, "max_weight": 75.0, "interval_s": 3.0}
    )
    data["tiers"]["batch"]["weight"] = 0.0  # awq is not judged here
    data["rollback"]["enabled"] = True
    progressive = stack.config.parent / "progression.yaml"
    progressive.write_text(yaml.safe_dump(data))
    try:
        done = subprocess.run(
            [sys.executable, "-m", "serving.ops.cli", "apply", str(progressive)], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        assert rollout()["tiers"]["standard"]["live_weight"] == 25.0  # the config's weight is the start
        for verb in ("pause", "resume"):  # the operator's commands, through the controller, with who asked
            done = subprocess.run(
                [sys.executable, "-m", "serving.ops.cli", "rollout", verb, "standard"], capture_output=True, text=True
            )
            assert done.returncode == 0, done.stderr
        refused = subprocess.run(
            [sys.executable, "-m", "serving.ops.cli", "rollout", "resume", "standard"], capture_output=True, text=True
        )
        assert (refused.returncode, refused.stderr.strip()) == (1, "error: tier standard is not paused")
        history = rollout()["tiers"]["standard"]["history"]
        assert [e["kind"] for e in history[-2:]] == ["pause", "resume"]
        assert "@" in history[-1]["by"]
        with traffic(("demo-standard",)):
            status = wait_until(
                lambda: (s := rollout())["tiers"]["standard"]["phase"] == "promoted" and s, 300, "the promotion"
            )
        steps = [
            (e["kind"], e["weight_before"], e["weight_after"])
            for e in status["tiers"]["standard"]["history"]
            if e["kind"] in ("step", "promoted")
        ][-3:]
        assert steps == [("step", 25.0, 50.0), ("step", 50.0, 75.0), ("promoted", 75.0, 100.0)]
        assert status["tiers"]["standard"]["live_weight"] == 100.0
        table = subprocess.run(
            [sys.executable, "-m", "serving.ops.cli", "rollout", "status"], capture_output=True, text=True, check=True
        ).stdout
        assert "int8 25% -> 50%" in table
        assert "promoted: " in table
        wait_until(lambda: exported("ray_serving_promotions_total", tier="standard") >= 1, 30, "the promotion counted")
    finally:
        assert apply_config(stack).returncode == 0  # the demo config: standard at 50 %, batch back at 50 %
