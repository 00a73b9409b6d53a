"""A replica's first seconds never count in the latency checks: an engine replica tells the controller it
started (`ReplicaStarted`), and the controller leaves its variant's latency samples of the next
`warmup_exclusion_s` out, while errors and quality signals still count. On the controller's logic with a
fake clock (no Ray)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from serving.config import Config, RollbackConfig, load_config
from serving.ops.cli import rollout_table
from serving.rollout.controller import Rollout, announce_started
from serving.rollout.signals import ComparisonSignal, ReplicaStarted, RequestSignal, Signal, from_json, to_json
from tests.clock import Clock

REPO = Path(__file__).resolve().parents[2]


def config(tmp_path: Path) -> Config:
    loaded = load_config(REPO / "deploy" / "tiny.yaml")
    rollback = loaded.rollback.model_copy(update={"state_file": tmp_path / "state.json", "warmup_exclusion_s": 30.0})
    return loaded.model_copy(update={"rollback": rollback})


def answers(variant: str, n: int, tpot_s: float, ok: bool = True) -> list[Signal]:
    return [RequestSignal("standard", variant, ok, tpot_s * 16, None, tpot_s) for _ in range(n)]


def cold_int8_then_warm(rollout: Rollout, clock: Clock, *, announce: bool) -> None:
    """An int8 replica restarts at 1000: its first answers are ten times slower than fp16's, then it is warm."""
    if announce:
        rollout.replica_started(ReplicaStarted("int8", "replica-b", clock.now))
    clock.now += 5
    rollout.report(answers("int8", 100, 0.1))
    clock.now += 40  # past the 30 s
    rollout.report(answers("int8", 200, 0.01) + answers("fp16", 300, 0.01))


def test_without_the_start_a_cold_replica_trips_the_latency_check(tmp_path: Path) -> None:
    """What the exclusion is for: the same traffic, no announcement, is a rollback on tpot_ratio."""
    clock = Clock()
    rollout = Rollout(config(tmp_path), clock)
    cold_int8_then_warm(rollout, clock, announce=False)
    assert rollout.evaluate() == ["standard"]
    assert rollout.status().tiers["standard"].history[-1]["reasons"] == ["tpot_ratio"]


def test_a_replicas_first_seconds_are_left_out_of_the_latency_checks_and_shown(tmp_path: Path) -> None:
    clock = Clock()
    rollout = Rollout(config(tmp_path), clock)
    cold_int8_then_warm(rollout, clock, announce=True)
    assert rollout.evaluate() == []
    tier = rollout.status().tiers["standard"]
    judged = {c["check"]: c for c in tier.checks}
    assert judged["tpot_ratio"]["samples"] == 200  # the warm ones only
    assert judged["tpot_ratio"]["value"] == pytest.approx(1.0)
    assert judged["error_rate"]["samples"] == 300  # the requests themselves still count
    assert tier.left_out == [
        {"variant": "int8", "replica": "replica-b", "start": 1000.0, "until": 1030.0, "samples": 100}
    ]
    table = rollout_table(rollout.status().model_dump(mode="json"))
    assert "left out: tier standard: 100 latency samples of int8, from 00:16:40 to 00:17:10 UTC" in table
    # A start of another tier's variant is not this tier's business.
    assert rollout.status().tiers["premium"].left_out == []


def test_after_the_exclusion_a_slow_candidate_still_trips(tmp_path: Path) -> None:
    clock = Clock()
    rollout = Rollout(config(tmp_path), clock)
    rollout.replica_started(ReplicaStarted("int8", "replica-b", clock.now))
    clock.now += 31
    rollout.report(answers("int8", 300, 0.1) + answers("fp16", 300, 0.01))
    assert rollout.evaluate() == ["standard"]


def test_errors_and_quality_signals_from_the_first_seconds_still_count(tmp_path: Path) -> None:
    clock = Clock()
    rollout = Rollout(config(tmp_path), clock)
    rollout.replica_started(ReplicaStarted("int8", "replica-b", clock.now))
    rollout.replica_started(ReplicaStarted("awq", "replica-c", clock.now))
    clock.now += 1
    rollout.report(answers("int8", 100, 0.01, ok=False))
    rollout.report([ComparisonSignal("batch", "awq", "fp16", "candidate", True, 0.15) for _ in range(30)])
    assert sorted(rollout.evaluate()) == ["batch", "standard"]
    assert rollout.status().tiers["standard"].history[-1]["reasons"] == ["error_rate"]


def test_a_late_announcement_or_a_skewed_clock_only_widens_the_exclusion(tmp_path: Path) -> None:
    """From the earlier of the replica's clock and the receipt to the later plus warmup_exclusion_s."""
    clock = Clock()
    rollout = Rollout(config(tmp_path), clock)
    clock.now += 5
    rollout.report(answers("int8", 100, 0.1))  # answered before the start reached the controller
    clock.now += 5
    rollout.replica_started(ReplicaStarted("int8", "replica-b", 1000.0))
    clock.now += 40
    rollout.report(answers("int8", 200, 0.01) + answers("fp16", 300, 0.01))
    assert rollout.evaluate() == []
    assert rollout.status().tiers["standard"].left_out[0]["until"] == 1040.0


def test_a_restarted_controller_still_leaves_them_out(tmp_path: Path) -> None:
    clock = Clock()
    first = Rollout(config(tmp_path), clock)
    first.replica_started(ReplicaStarted("int8", "replica-b", clock.now))
    clock.now += 5
    first.report(answers("int8", 100, 0.1))
    first.save_window(force=True)
    again = Rollout(config(tmp_path), clock, restarted=True)
    clock.now += 40
    again.report(answers("int8", 200, 0.01) + answers("fp16", 300, 0.01))
    assert again.evaluate() == []
    assert again.status().tiers["standard"].left_out[0]["samples"] == 100


def test_the_signal_round_trips_through_the_saved_window() -> None:
    signal = ReplicaStarted("fp16", "abc", 1234.5)
    assert from_json(to_json(signal)) == signal


def test_the_exclusion_must_fit_in_the_window() -> None:
    assert RollbackConfig().warmup_exclusion_s == 30.0
    with pytest.raises(ValidationError, match="exceeds window_s"):
        RollbackConfig(window_s=20.0)
    assert RollbackConfig(window_s=20.0, warmup_exclusion_s=0.0).warmup_exclusion_s == 0.0


class FakeController:
    def __init__(self) -> None:
        self.told: list[ReplicaStarted] = []
        self.replica_started = self

    async def _deliver(self, signal: ReplicaStarted) -> None:
        self.told.append(signal)

    def remote(self, signal: ReplicaStarted) -> Any:
        return self._deliver(signal)


def test_a_replica_announces_its_start_once_the_controller_exists() -> None:
    fake, lookups = FakeController(), []

    def lookup() -> FakeController:
        lookups.append(1)
        if len(lookups) < 3:
            raise ValueError("Failed to look up actor")  # as ray.get_actor before a router created it
        return fake

    signal = ReplicaStarted("fp16", "abc", 1234.5)
    assert asyncio.run(announce_started(signal, lookup, pause_s=0.0)) is True
    assert fake.told == [signal]
    assert len(lookups) == 3


def test_a_replica_gives_up_announcing_with_a_warning_never_an_error(caplog: pytest.LogCaptureFixture) -> None:
    def lookup() -> None:
        raise ValueError("Failed to look up actor")

    with caplog.at_level(logging.WARNING, logger="serving.rollout"):
        assert asyncio.run(announce_started(ReplicaStarted("fp16", "abc", 1.0), lookup, tries=3, pause_s=0.0)) is False
    assert "could not tell the rollout controller that abc started" in caplog.text
