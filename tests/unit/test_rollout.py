from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import pytest
from pydantic import ValidationError

from serving.config import Config, load_config
from serving.metrics import sample as metric_sample
from serving.rollout import checks, store
from serving.rollout.controller import Rollout, RolloutStatus
from serving.rollout.phases import TRANSITIONS, Event, InvalidTransition, Phase, next_phase
from serving.rollout.signals import ComparisonSignal, FeedbackSignal, RequestSignal, Signal, Snapshot
from tests.clock import Clock

REPO = Path(__file__).resolve().parents[2]
T = checks.Thresholds(
    min_samples=30,
    confidence_z=2.576,
    max_error_rate=0.02,
    latency_quantile=0.95,
    max_latency_ratio=2.0,
    max_disagreement_rate=0.8,
    max_score_drift=0.05,
    max_override_rate_delta=0.05,
)


def by_check(window: checks.Window) -> dict[str, checks.Verdict]:
    return {v.check: v for v in checks.evaluate(window, T)}


def test_wilson_bounds() -> None:
    low, high = checks.wilson_bounds(0, 100, 1.96)
    assert low == 0.0
    assert 0.03 < high < 0.04
    low, high = checks.wilson_bounds(50, 100, 1.96)
    assert low == pytest.approx(0.404, abs=0.001)
    assert high == pytest.approx(0.596, abs=0.001)
    assert checks.wilson_bounds(0, 0, 1.96) == (0.0, 1.0)


def test_no_check_judges_below_min_samples() -> None:
    window = checks.Window(disagreements=[True] * 29, drifts=[9.0] * 29, candidate_requests=29, candidate_errors=29)
    assert not any(v.failed for v in checks.evaluate(window, T))
    assert all(v.value is None for v in checks.evaluate(window, T))


def test_drift_and_disagreement_trip_above_the_noise_floor() -> None:
    awq_like = checks.Window(disagreements=[True] * 40, drifts=[0.15] * 40)
    verdicts = by_check(awq_like)
    assert verdicts["score_drift"].failed
    assert verdicts["disagreement"].failed
    int8_like = checks.Window(disagreements=[True, False] * 30, drifts=[0.005] * 60)
    assert not any(v.failed for v in checks.evaluate(int8_like, T))
    # The same drift is fine when the noise floor explains it.
    noisy = checks.Window(drifts=[0.15] * 40, floor_drifts=[0.14] * 10)
    assert not by_check(noisy)["score_drift"].failed


def test_error_rate_latency_and_override_checks() -> None:
    errors = checks.Window(candidate_requests=100, candidate_errors=10)
    assert by_check(errors)["error_rate"].failed
    one_error = checks.Window(candidate_requests=40, candidate_errors=1)
    assert not by_check(one_error)["error_rate"].failed  # 2.5 % observed, but the lower bound is far below 2 %
    slow = checks.Window(candidate_ttfts=[1.0] * 200, baseline_ttfts=[0.1] * 200)
    assert by_check(slow)["ttft_ratio"].failed
    slow = checks.Window(candidate_tpots=[0.05] * 200, baseline_tpots=[0.01] * 200)
    assert by_check(slow)["tpot_ratio"].failed
    overridden = checks.Window(candidate_requests=50, baseline_requests=50, candidate_overrides=10)
    assert by_check(overridden)["override_rate"].failed


def test_a_candidate_judged_against_itself_never_trips() -> None:
    """The false-trip rate, computed: a candidate that is the baseline's own variant disagrees and
    drifts only as much as the noise floor, and is as fast. 5,000 windows of 30 to 1,000 requests, with a
    noise floor that disagrees 30 % of the time (temperature > 0) and drifts ~0.02 per token, and
    heavy-tailed latencies with a few cold starts 20 times slower, on either side."""
    rng = random.Random(1)
    comparisons = trips = latency_judged = 0
    for _ in range(5000):
        n = rng.randint(30, 1000)
        window = checks.Window(
            disagreements=[rng.random() < 0.3 for _ in range(n)],
            drifts=[abs(rng.gauss(0.02, 0.01)) for _ in range(n)],
            floor_disagreements=[rng.random() < 0.3 for _ in range(20)],
            floor_drifts=[abs(rng.gauss(0.02, 0.01)) for _ in range(20)],
            candidate_requests=n,
            baseline_requests=n,
            candidate_errors=sum(rng.random() < 0.001 for _ in range(n)),
            candidate_ttfts=latencies(rng, n),
            baseline_ttfts=latencies(rng, n),
            candidate_tpots=latencies(rng, n, median=0.01),
            baseline_tpots=latencies(rng, n, median=0.01),
        )
        comparisons += n
        verdicts = checks.evaluate(window, T)
        trips += any(v.failed for v in verdicts)
        latency_judged += any(v.value is not None for v in verdicts if v.check in ("ttft_ratio", "tpot_ratio"))
    assert comparisons > 1_000_000
    assert latency_judged > 4000  # the latency checks really judged most windows
    assert trips == 0


def latencies(rng: random.Random, n: int, median: float = 0.08) -> list[float]:
    """Log-normal latencies, 1 % of them cold starts 20 times slower."""
    return [median * rng.lognormvariate(0, 0.4) * (20 if rng.random() < 0.01 else 1) for _ in range(n)]


def test_a_real_latency_regression_trips_once_the_quantile_can_be_bounded() -> None:
    rng = random.Random(2)
    for n, judged in ((100, False), (400, True)):
        window = checks.Window(
            candidate_tpots=[3 * x for x in latencies(rng, n, median=0.01)],
            baseline_tpots=latencies(rng, n, median=0.01),
        )
        verdict = by_check(window)["tpot_ratio"]
        assert (verdict.value is not None, verdict.failed) == (judged, judged)


def test_quantile_bounds_cover_the_true_quantile() -> None:
    """The interval holds the true p95 of a log-normal in at least 99 % of 2,000 draws of 300 (z = 2.576)."""
    rng = random.Random(3)
    true_p95 = 2.718281828 ** (1.6448536 * 0.5)  # exp(z_0.95 * sigma) with sigma 0.5
    covered = 0
    for _ in range(2000):
        bounds = checks.quantile_bounds([rng.lognormvariate(0, 0.5) for _ in range(300)], 0.95, 2.576)
        assert bounds is not None
        covered += bounds[0] <= true_p95 <= bounds[1]
    assert covered / 2000 >= 0.985
    assert checks.quantile_bounds([1.0] * 100, 0.99, 2.576) is None  # p99 needs far more than 100


@pytest.mark.parametrize(("start", "event", "end"), [(k[0], k[1], v) for k, v in TRANSITIONS.items()])
def test_every_transition(start: Phase, event: Event, end: Phase) -> None:
    assert next_phase(start, event) is end


def test_undefined_transitions_are_refused() -> None:
    with pytest.raises(InvalidTransition):
        next_phase(Phase.IDLE, Event.CHECK_FAILED)


def demo_config(tmp_path: Path, **batch: object) -> Config:
    # The tiny family's thresholds (score drift 0.05): the awq signals below drift 0.15 per token.
    config = load_config(REPO / "deploy" / "tiny.yaml")
    tiers = dict(config.tiers)
    tiers["batch"] = tiers["batch"].model_copy(update=batch)
    rollback = config.rollback.model_copy(update={"state_file": tmp_path / "state.json"})
    return config.model_copy(update={"tiers": tiers, "rollback": rollback})


def awq_signals(n: int) -> list[Signal]:
    return [ComparisonSignal("batch", "awq", "fp16", "candidate", True, 0.15) for _ in range(n)]


def test_a_failing_candidate_goes_to_zero_is_persisted_and_stays_rolled_back(tmp_path: Path) -> None:
    clock = Clock()
    rollout = Rollout(demo_config(tmp_path), clock)
    assert rollout.weights()["batch"] == 50.0
    rollout.report(awq_signals(29))
    assert rollout.evaluate() == []
    rollout.report(awq_signals(1))
    assert rollout.evaluate() == ["batch"]
    assert rollout.weights()["batch"] == 0.0
    assert rollout.weights()["standard"] == 50.0  # other tiers are untouched
    event = rollout.status().tiers["batch"].history[-1]
    # 30 pairs that all disagree bound the rate from below at 0.82 (Wilson, z 2.576): under the tiny family's 0.9.
    assert set(event["reasons"]) == {"score_drift"}
    assert event["values"]["score_drift"] == pytest.approx(0.15)
    assert event["thresholds"]["score_drift"] == 0.05
    assert event["samples"]["score_drift"] == 30

    # A controller that crashed and came back restores the last applied config from its state, even
    # when it was first created with another one: still rolled back.
    crashed = Rollout(demo_config(tmp_path, weight=20.0), clock, restarted=True)
    assert crashed.weights()["batch"] == 0.0
    assert crashed.config.tiers["batch"].weight == 50.0
    # A new controller under the same config (a redeploy) reads the state file: still rolled back.
    again = Rollout(demo_config(tmp_path), clock)
    assert again.weights()["batch"] == 0.0
    assert again.status().tiers["batch"].phase == "rolled_back"
    # Re-applying the same config does not re-enable it; changing the tier's config does.
    again.apply(demo_config(tmp_path))
    assert again.weights()["batch"] == 0.0
    clock.now += 10
    again.apply(demo_config(tmp_path, weight=10.0))
    assert again.weights()["batch"] == 10.0
    assert again.status().tiers["batch"].phase == "progressing"
    # The old bad signals are from before the re-enable and are not judged again.
    assert again.evaluate() == []


def test_a_healthy_candidate_is_not_rolled_back(tmp_path: Path) -> None:
    rollout = Rollout(demo_config(tmp_path), Clock())
    rollout.report([ComparisonSignal("standard", "int8", "fp16", "candidate", i % 2 == 0, 0.005) for i in range(200)])
    rollout.report([RequestSignal("standard", v, True, 0.08, 0.02, 0.01) for v in ("int8", "fp16") for _ in range(100)])
    assert rollout.evaluate() == []
    checks_seen = {c["check"]: c for c in rollout.status().tiers["standard"].checks}
    assert checks_seen["score_drift"]["value"] == pytest.approx(0.005)
    assert not any(c["failed"] for c in checks_seen.values())


def test_signals_older_than_the_window_are_forgotten(tmp_path: Path) -> None:
    clock = Clock()
    rollout = Rollout(demo_config(tmp_path), clock)
    rollout.report(awq_signals(20))
    clock.now += rollout.config.rollback.window_s + 1
    rollout.report(awq_signals(20))
    assert rollout.evaluate() == []  # 20 + 20, but never 30 inside one window


def test_rollout_status_prints_as_a_table(tmp_path: Path) -> None:
    from serving.ops.cli import rollout_table

    rollout = Rollout(demo_config(tmp_path), Clock())
    rollout.report(awq_signals(30))
    rollout.evaluate()
    table = rollout_table(rollout.status().model_dump(mode="json")).splitlines()
    assert table[0].split()[:6] == ["TIER", "PHASE", "BASELINE", "CANDIDATE", "WEIGHT", "LIVE"]
    batch = next(line for line in table if line.startswith("batch "))
    assert batch.split()[:6] == ["batch", "rolled_back", "int8", "awq", "50", "0"]
    assert "score_drift=0.150! (max 0.05, n=30)" in batch
    assert any(line.startswith("rolled back:") and "tier batch: awq 50% -> 0" in line for line in table)


@pytest.mark.parametrize("damage", ["truncate", "not-an-object", "binary", "unknown-phase", "short-secret"])
def test_a_damaged_state_file_gives_a_fail_safe_start_with_a_clear_error(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    config = demo_config(tmp_path)
    Rollout(config, Clock())  # writes a good state file
    path = config.rollback.state_file
    good = path.read_bytes()
    # Well-formed JSON of the wrong shape is damage too: an unknown phase used to crash every controller start.
    unknown_phase, short_secret = json.loads(good), json.loads(good)
    unknown_phase["tiers"]["batch"]["phase"] = "wizard"
    short_secret["secret"] = "abc"
    path.write_bytes(
        {
            "truncate": good[: len(good) // 2],
            "not-an-object": b"[1, 2]",
            "binary": b"\xff\xfe\x00",
            "unknown-phase": json.dumps(unknown_phase).encode(),
            "short-secret": json.dumps(short_secret).encode(),
        }[damage]
    )

    started = Rollout(config, Clock())  # does not raise: Ray would not restart a controller that did
    assert started.weights() == {"premium": 0.0, "standard": 0.0, "batch": 0.0}  # every candidate held at 0
    reason = started.status().fail_safe
    assert reason is not None
    assert "could not be read" in reason
    assert "serving apply" in reason
    assert started.snapshot(0).fail_safe == reason
    from serving.ops.cli import rollout_table

    assert f"FAIL-SAFE: {reason}" in rollout_table(started.status().model_dump(mode="json"))
    assert "FAIL-SAFE START" in caplog.text
    (aside,) = tmp_path.glob("state.json.damaged-*")  # kept for the operator, never deleted
    assert aside.read_bytes() != good

    # The fail-safe state is itself saved: a restart keeps holding, until an operator applies a config.
    assert Rollout(config, Clock(), restarted=True).weights()["batch"] == 0.0
    started.apply(config)
    assert started.weights() == {"premium": 0.0, "standard": 50.0, "batch": 50.0}
    assert started.status().fail_safe is None


def test_a_state_file_with_an_invalid_config_gives_a_fail_safe_start(tmp_path: Path) -> None:
    config = demo_config(tmp_path)
    Rollout(config, Clock())
    path = config.rollback.state_file
    state = json.loads(path.read_text())
    state["config"] = '{"model": 3}'
    path.write_text(json.dumps(state))
    restarted = Rollout(config, Clock(), restarted=True)
    assert "its config is invalid" in (restarted.status().fail_safe or "")
    assert restarted.weights()["standard"] == 0.0


def test_a_config_that_cannot_be_saved_is_not_applied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rollout = Rollout(demo_config(tmp_path), Clock())

    def disk_full(path: Path, state: dict[str, object]) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "save_state", disk_full)
    with pytest.raises(OSError, match="No space"):
        rollout.apply(demo_config(tmp_path, weight=90.0))
    assert (rollout.version, rollout.weights()["batch"]) == (1, 50.0)  # memory did not run ahead of the file


def test_a_rollback_that_cannot_be_saved_still_holds_the_candidate_at_zero(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rollout = Rollout(demo_config(tmp_path), Clock())
    monkeypatch.setattr(store, "save_state", lambda path, state: (_ for _ in ()).throw(OSError("disk gone")))
    rollout.report(awq_signals(30))
    assert rollout.evaluate() == ["batch"]
    assert rollout.weights()["batch"] == 0.0


def test_the_state_file_is_private_and_keeps_the_secret(tmp_path: Path) -> None:
    config = demo_config(tmp_path)
    first = Rollout(config, Clock())
    assert oct(config.rollback.state_file.stat().st_mode & 0o777) == "0o600"
    secret = first.snapshot(0).secret
    assert len(bytes.fromhex(secret)) == 32
    assert Rollout(config, Clock(), restarted=True).snapshot(0).secret == secret  # buckets survive
    assert list(tmp_path.glob("*.tmp")) == []


def test_a_snapshot_carries_the_config_only_to_a_router_behind_and_survives_pickling(tmp_path: Path) -> None:
    rollout = Rollout(demo_config(tmp_path), Clock())
    behind, current = rollout.snapshot(0), rollout.snapshot(rollout.version)
    assert behind.config is not None
    assert Config.model_validate_json(behind.config) == rollout.config
    assert current.config is None
    assert pickle.loads(pickle.dumps(current)) == current  # it crosses a Ray call
    with pytest.raises(ValidationError):  # a malformed snapshot is refused, not half read
        Snapshot.model_validate({**current.model_dump(), "weights": {"batch": "half"}})


def test_the_status_wire_form_reads_back_as_the_typed_status(tmp_path: Path) -> None:
    rollout = Rollout(demo_config(tmp_path), Clock())
    rollout.report(awq_signals(30))
    rollout.evaluate()  # a rollback: history and checks are not empty
    status = rollout.status()
    wire = status.model_dump(mode="json")  # what `serving rollout status --json` and /admin/rollout show
    assert wire["tiers"]["batch"]["phase"] == "rolled_back"
    assert RolloutStatus.model_validate(wire) == status


def test_override_votes_never_outnumber_the_answers_they_judge(tmp_path: Path) -> None:
    rollout = Rollout(demo_config(tmp_path), Clock())
    tier = rollout.config.tiers["batch"]
    votes: list[Signal] = [FeedbackSignal("batch", "awq", True, f"cmpl-{i}") for i in range(40)]
    rollout.report([RequestSignal("batch", "awq", True, 0.1, None, 0.01)] * 3 + votes)
    window = rollout.window("batch", tier, 0.0)
    assert (window.candidate_requests, window.candidate_overrides) == (3, 3)


def test_signals_of_another_version_are_dropped_not_misread(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rollout = Rollout(demo_config(tmp_path), Clock())
    old = RequestSignal("batch", "awq", False, 0.1, None, None, version=1)
    rollout.report([old, RequestSignal("batch", "awq", True, 0.1, None, 0.01)])
    window = rollout.window("batch", rollout.config.tiers["batch"], 0.0)
    assert (window.candidate_requests, window.candidate_errors) == (1, 0)
    assert "dropped 1 signals of another version" in caplog.text


def test_rollbacks_and_phase_changes_are_logged_as_kubernetes_style_events(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="serving.rollout")
    rollout = Rollout(demo_config(tmp_path), Clock())
    rollout.report(awq_signals(30))
    rollout.evaluate()
    rollout.apply(demo_config(tmp_path, weight=100.0))
    events = [r.getMessage() for r in caplog.records if r.getMessage().startswith("event ")]
    assert any(
        e.startswith("event type=Warning reason=RolledBack object=tier/batch message='awq 50% -> 0: score_drift")
        for e in events
    ), events
    assert "event type=Normal reason=Promoted object=tier/batch message='awq at 100%'" in events
    assert sum("reason=RolledBack" in e for e in events) == 1  # one line per event


def test_the_controller_counts_rollbacks_and_promotions_once_in_its_own_metrics(tmp_path: Path) -> None:
    rollout = Rollout(demo_config(tmp_path), Clock())
    metrics = rollout.metrics
    batch = {"tier": "batch", "reason": "score_drift"}
    assert metric_sample(metrics, "ray_serving_rollbacks_total", batch) == 0  # a zero from the start
    assert metric_sample(metrics, "ray_serving_rollout_phase", {"tier": "batch", "phase": "progressing"}) == 1
    rollout.report(awq_signals(30))
    assert rollout.evaluate() == ["batch"]
    rollout.evaluate()  # judged again: a rolled-back tier is not counted twice
    assert metric_sample(metrics, "ray_serving_rollbacks_total", batch) == 1
    assert metric_sample(metrics, "ray_serving_rollout_phase", {"tier": "batch", "phase": "rolled_back"}) == 1
    assert metric_sample(metrics, "ray_serving_rollout_phase", {"tier": "batch", "phase": "progressing"}) == 0
    assert metric_sample(metrics, "ray_serving_promotions_total", {"tier": "standard"}) == 0
    standard = {
        **rollout.config.tiers,
        "standard": rollout.config.tiers["standard"].model_copy(update={"weight": 100.0}),
    }
    rollout.apply(rollout.config.model_copy(update={"tiers": standard}))
    assert metric_sample(metrics, "ray_serving_promotions_total", {"tier": "standard"}) == 1
    assert metric_sample(metrics, "ray_serving_rollout_phase", {"tier": "standard", "phase": "promoted"}) == 1
    assert metric_sample(metrics, "ray_serving_rollout_fail_safe") == 0


def test_the_controller_publishes_the_live_weights_once_for_every_router(tmp_path: Path) -> None:
    rollout = Rollout(demo_config(tmp_path), Clock())

    def published(tier: str, candidate: str) -> float | None:
        labels = {"tier": tier, "candidate": candidate}
        return metric_sample(rollout.metrics, "ray_serving_canary_weight_percent", labels)

    assert (published("batch", "awq"), published("standard", "int8"), published("premium", "none")) == (50, 50, 0)
    rollout.report(awq_signals(30))
    assert rollout.evaluate() == ["batch"]
    assert published("batch", "awq") == 0  # what every router is told from now on
    # A tier given another candidate: the old candidate's series goes to 0, not a stale weight that reads as live.
    tiers = dict(rollout.config.tiers)
    tiers["standard"] = tiers["standard"].model_copy(update={"candidate": "awq", "weight": 20.0})
    rollout.apply(rollout.config.model_copy(update={"tiers": tiers}))
    assert (published("standard", "int8"), published("standard", "awq")) == (0, 20)
