"""Progressive promotion and an operator's pause, resume and abort, on the controller's logic with a
fake clock (no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from serving.config import Config, ProgressionConfig, TierConfig, load_config
from serving.metrics import sample as metric_sample
from serving.ops.cli import rollout_table
from serving.rollout.controller import Rollout
from serving.rollout.signals import ComparisonSignal, RequestSignal, Signal
from tests.clock import Clock

REPO = Path(__file__).resolve().parents[2]
STEPS = ProgressionConfig(step_weight=20.0, max_weight=50.0, interval_s=60.0)


def config(tmp_path: Path, weight: float = 10.0, progression: ProgressionConfig | None = STEPS) -> Config:
    loaded = load_config(REPO / "deploy" / "tiny.yaml")
    standard = loaded.tiers["standard"].model_copy(update={"weight": weight, "progression": progression})
    rollback = loaded.rollback.model_copy(update={"state_file": tmp_path / "state.json"})
    return loaded.model_copy(update={"tiers": {**loaded.tiers, "standard": standard}, "rollback": rollback})


def healthy(n: int = 40) -> list[Signal]:
    """int8-like: as fast as the baseline, no errors, drift within bounds."""
    requests: list[Signal] = [
        RequestSignal("standard", v, True, 0.1, 0.02, 0.01) for v in ("int8", "fp16") for _ in range(n)
    ]
    return requests + [ComparisonSignal("standard", "int8", "fp16", "candidate", False, 0.005) for _ in range(n)]


def passing_interval(rollout: Rollout, clock: Clock) -> None:
    clock.now += 61
    rollout.report(healthy())
    assert rollout.evaluate() == []


def test_a_passing_candidate_steps_up_to_max_weight_then_is_promoted(tmp_path: Path) -> None:
    clock = Clock()
    rollout = Rollout(config(tmp_path), clock)
    assert rollout.weights()["standard"] == 10.0  # the config's weight is the start
    status = rollout.status().tiers["standard"]
    assert status.next_step == {"weight": 30.0, "at": 1060.0}
    rollout.report(healthy())
    clock.now += 30
    assert rollout.evaluate() == []
    assert rollout.weights()["standard"] == 10.0  # not a whole interval yet
    seen, published = [], []
    labels = {"tier": "standard", "candidate": "int8"}
    for _ in range(3):
        passing_interval(rollout, clock)
        seen.append(rollout.weights()["standard"])
        published.append(metric_sample(rollout.metrics, "ray_serving_canary_weight_percent", labels))
    assert seen == published == [30.0, 50.0, 100.0]  # each step in the controller's weight gauge
    tier = rollout.status().tiers["standard"]
    assert tier.phase == "promoted"
    assert tier.next_step is None
    assert [(e["kind"], e["weight_before"], e["weight_after"]) for e in tier.history] == [
        ("step", 10.0, 30.0),
        ("step", 30.0, 50.0),
        ("promoted", 50.0, 100.0),
    ]
    assert metric_sample(rollout.metrics, "ray_serving_promotions_total", {"tier": "standard"}) == 1
    table = rollout_table(rollout.status().model_dump(mode="json"))
    assert "step: " in table
    assert "promoted: " in table
    assert "int8 50% -> 100%" in table


def test_a_step_that_reaches_100_promotes_at_once_one_event_one_count(tmp_path: Path) -> None:
    """max_weight 100: the step that lands on 100 is the promotion. It used to be recorded and counted as a
    promotion while the phase stayed progressing, and the next interval promoted (and counted) again."""
    clock = Clock()
    rollout = Rollout(config(tmp_path, weight=60.0, progression=STEPS.model_copy(update={"max_weight": 100.0})), clock)
    for _ in range(4):
        passing_interval(rollout, clock)
    tier = rollout.status().tiers["standard"]
    assert tier.phase == "promoted"
    assert tier.live_weight == 100.0
    assert [(e["kind"], e["weight_before"], e["weight_after"]) for e in tier.history] == [
        ("step", 60.0, 80.0),
        ("promoted", 80.0, 100.0),
    ]
    assert metric_sample(rollout.metrics, "ray_serving_promotions_total", {"tier": "standard"}) == 1


def test_no_step_without_evidence(tmp_path: Path) -> None:
    clock = Clock()
    rollout = Rollout(config(tmp_path), clock)
    clock.now += 600
    rollout.report(healthy(5))  # fewer than min_samples requests: nothing was judged
    rollout.evaluate()
    assert rollout.weights()["standard"] == 10.0


def test_a_failing_check_rolls_back_mid_progression(tmp_path: Path) -> None:
    clock = Clock()
    rollout = Rollout(config(tmp_path), clock)
    passing_interval(rollout, clock)
    assert rollout.weights()["standard"] == 30.0
    rollout.report([ComparisonSignal("standard", "int8", "fp16", "candidate", True, 0.5) for _ in range(200)])
    assert rollout.evaluate() == ["standard"]
    assert rollout.weights()["standard"] == 0.0
    event = rollout.status().tiers["standard"].history[-1]
    assert (event["kind"], event["phase_before"], event["weight_before"]) == ("rollback", "progressing", 30.0)


def test_the_progression_survives_a_restart_and_a_reapply_changes_nothing(tmp_path: Path) -> None:
    clock = Clock()
    rollout = Rollout(config(tmp_path), clock)
    passing_interval(rollout, clock)
    again = Rollout(config(tmp_path), clock, restarted=True)
    assert again.weights()["standard"] == 30.0
    again.apply(config(tmp_path))  # the same file
    assert again.weights()["standard"] == 30.0
    assert (again.status().tiers["standard"].next_step or {}).get("at") == 1061.0 + 60
    again.apply(config(tmp_path, weight=5.0))  # a changed tier starts again from its weight
    assert again.weights()["standard"] == 5.0


def test_a_promoted_tier_stays_promoted_when_the_same_file_is_applied(tmp_path: Path) -> None:
    clock = Clock()
    rollout = Rollout(config(tmp_path), clock)
    for _ in range(3):
        passing_interval(rollout, clock)
    rollout.apply(config(tmp_path))
    assert (rollout.status().tiers["standard"].phase, rollout.weights()["standard"]) == ("promoted", 100.0)


def test_pause_holds_resume_waits_a_whole_interval_abort_rolls_back(tmp_path: Path) -> None:
    clock = Clock()
    rollout = Rollout(config(tmp_path), clock)
    tier = rollout.operate("standard", "pause", "ana@ops-1")
    assert tier["paused"] == {"by": "ana@ops-1", "at": 1000.0}
    assert tier["next_step"] is None
    passing_interval(rollout, clock)
    assert rollout.weights()["standard"] == 10.0  # held
    assert "paused by ana@ops-1" in rollout_table(rollout.status().model_dump(mode="json"))
    with pytest.raises(ValueError, match="already paused"):
        rollout.operate("standard", "pause", "bo@ops-2")
    rollout.operate("standard", "resume", "bo@ops-2")
    clock.now += 30
    rollout.report(healthy())
    rollout.evaluate()
    assert rollout.weights()["standard"] == 10.0  # a whole interval after the resume
    passing_interval(rollout, clock)
    assert rollout.weights()["standard"] == 30.0
    rollout.operate("standard", "abort", "ana@ops-1")
    assert rollout.weights()["standard"] == 0.0
    assert Rollout(config(tmp_path), clock, restarted=True).weights()["standard"] == 0.0  # persisted
    history = rollout.status().tiers["standard"].history
    assert [(e["kind"], e["by"]) for e in history] == [
        ("pause", "ana@ops-1"),
        ("resume", "bo@ops-2"),
        ("step", "controller"),
        ("abort", "ana@ops-1"),
    ]
    assert "abort: " in rollout_table(rollout.status().model_dump(mode="json"))
    assert "by ana@ops-1" in rollout_table(rollout.status().model_dump(mode="json"))


def test_operations_that_make_no_sense_are_refused_with_a_reason(tmp_path: Path) -> None:
    rollout = Rollout(config(tmp_path), Clock())
    with pytest.raises(ValueError, match="no tier 'gold'"):
        rollout.operate("gold", "pause", "x@y")
    with pytest.raises(ValueError, match="nothing to pause"):
        rollout.operate("premium", "pause", "x@y")
    with pytest.raises(ValueError, match="not paused"):
        rollout.operate("standard", "resume", "x@y")
    with pytest.raises(ValueError, match="no live candidate"):
        rollout.operate("premium", "abort", "x@y")


def test_progression_config_is_validated() -> None:
    with pytest.raises(ValidationError, match="exceeds max_weight"):
        TierConfig(baseline="fp16", candidate="int8", weight=60.0, progression=STEPS)
    with pytest.raises(ValidationError, match="needs a candidate"):
        TierConfig(baseline="fp16", progression=STEPS)
    with pytest.raises(ValidationError, match="resolution"):
        ProgressionConfig(step_weight=0.0001, interval_s=1)
