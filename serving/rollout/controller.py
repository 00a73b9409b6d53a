"""The rollout controller: one named Ray actor per application, the single writer of live canary
weights. Routers poll it for the applied config and the live weights, and report their signals to it;
every `interval_s` it judges each tier's candidate over a sliding window and rolls back what fails.

`Rollout` is the logic, clock and storage passed in, testable without Ray; `RolloutController` is the
actor around it.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import logging
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import ray
from pydantic import BaseModel, Field

from serving.config import Config, ProgressionConfig, TierConfig
from serving.metrics import ActorExport, ControllerMetrics
from serving.rollout import checks, signals, store
from serving.rollout.phases import Event, Phase, next_phase
from serving.rollout.signals import (
    ComparisonSignal,
    FeedbackSignal,
    ReplicaStarted,
    RequestSignal,
    Signal,
    Snapshot,
    VariantUnfit,
)
from serving.route.drain import DrainBook, DrainStatus, RouterReport

logger = logging.getLogger("serving.rollout")

NAMESPACE = "serving"
CONTROLLER_NAME = "serving-rollout-controller"
MAX_HISTORY = 50
MAX_BATCHES = 100_000  # batch ids of delivered signals, to drop a batch a router sent again
MAX_SAVED_BATCHES = 1_000  # enough for the batches of every router since the last save
# A candidate whose replicas start this many times more than it has replicas, within the window, keeps dying after
# its verification passed: it is taken out of the rollout (unfit) instead of being retried on the hot path.
MAX_RESTARTS = 3
RESTART_WINDOW_S = 600.0
MAX_VOTES = 1_000_000  # response ids that had feedback; ~100 MB at worst, far more than one tier's votes a day


# The reason an event gives for a tier entering each phase.
PHASE_REASONS = {
    Phase.IDLE: "Idle",
    Phase.PROGRESSING: "Progressing",
    Phase.PROMOTED: "Promoted",
    Phase.ROLLED_BACK: "RolledBack",
}


def emit_event(kind: str, reason: str, tier: str, message: str) -> None:
    """One log line per rollout event, shaped like a Kubernetes event (type, reason, object, message),
    so that log pipelines that already parse those pick rollbacks and promotions up as they are."""
    log = logger.warning if kind == "Warning" else logger.info
    log("event type=%s reason=%s object=tier/%s message=%r", kind, reason, tier, message)


class TierStatus(BaseModel):
    """One tier as `serving rollout status` shows it."""

    phase: Phase
    baseline: str
    candidate: str | None
    unfit: str | None = Field(None, description="why the candidate is unfit on this machine: out of the rollout")
    configured_weight: float = Field(ge=0, le=100, description="the config's weight (a progression's start)")
    live_weight: float = Field(ge=0, le=100, description="the weight the routers use now")
    progression: dict[str, float] | None
    next_step: dict[str, float] | None = Field(description="a progression's next weight and its earliest time")
    paused: dict[str, Any] | None = Field(description="who paused the tier, and when")
    checks: list[dict[str, Any]] = Field(description="the last judgement: each check's value, threshold, samples")
    left_out: list[dict[str, Any]] = Field(
        default_factory=list,
        description="replica starts of the tier's variants in the last judgement, each with how many latency "
        "samples of its first seconds were left out of the latency checks",
    )
    history: list[dict[str, Any]] = Field(description="rollbacks, steps, promotions and operator actions")


class RolloutStatus(BaseModel):
    config_version: int
    fail_safe: str | None = Field(description="why every candidate is held at 0, if the state file was damaged")
    interval_s: float
    tiers: dict[str, TierStatus]


def next_weight(progression: ProgressionConfig, before: float) -> float:
    """A progression's weight after one more step from `before`: 100 (promoted) once at `max_weight`."""
    if before >= progression.max_weight:
        return 100.0
    return min(progression.max_weight, round(before + progression.step_weight, 3))


def step_due_at(record: dict[str, Any], progression: ProgressionConfig) -> float:
    """The earliest time of a tier's next step: a whole interval after its last (or its judging's start)."""
    return float(record.get("step_at", record.get("since", 0.0))) + progression.interval_s


@dataclass
class WarmUp:
    """A replica's first seconds: its variant's latency samples received from `start` to `until` are left
    out of the latency checks. Every sample of the variant, not only the new replica's (no router knows which
    replica answered): with several replicas that leaves out some warm ones too, fewer samples, never a
    false trip. From the earlier of the replica's clock and the controller's receipt to the later plus
    `warmup_exclusion_s`: a skewed clock or a late delivery only widens it."""

    variant: str
    replica: str
    start: float
    until: float
    samples: int = 0  # left out by the last judgement


def tier_hash(tier: TierConfig) -> str:
    return hashlib.sha256(tier.model_dump_json().encode()).hexdigest()[:16]


class Rollout:
    def __init__(
        self,
        config: Config,
        clock: Callable[[], float] = time.time,
        *,
        restarted: bool = False,
        metrics: ControllerMetrics | None = None,
    ) -> None:
        """`restarted`: this is the same controller coming back after a crash, so the last applied
        config (persisted with the state) wins over the one it was first created with."""
        self.clock = clock
        self.metrics = metrics or ControllerMetrics()  # in memory, unless the actor passes Ray's export
        self.events: deque[tuple[float, Signal]] = deque()
        self.state = store.load_state(config.rollback.state_file)
        if restarted and "config" in self.state:
            try:
                config = Config.model_validate_json(self.state["config"])
            except ValueError as exc:  # pydantic's ValidationError is one
                self.state = store.quarantine(config.rollback.state_file, f"its config is invalid: {exc}")
        self.config = config
        self.version = int(self.state.get("version", 1)) if restarted else 1
        # Keys the sticky split (serving.route.routing) and signs response ids (serving.route.attribution); kept with
        # the state, so buckets and feedback ids survive restarts.
        self.state.setdefault("secret", secrets.token_hex(32))
        self.latest: dict[str, list[dict[str, Any]]] = {}
        self.left_out: dict[str, list[dict[str, Any]]] = {}  # the last judgement's warm-ups, per tier
        self.votes: OrderedDict[str, float] = OrderedDict()  # response id -> when its vote was taken
        self.batches: OrderedDict[str, None] = OrderedDict()  # signal batches taken (serving.rollout.follower)
        self.window_saved_at = self.clock()
        self.published_weights: set[tuple[str, str]] = set()  # (tier, candidate) series of the weight gauge
        # Variants their own replicas found unfit on this machine (serving.engine.verify): out of every tier's rollout
        # while this controller runs. Not saved: a fresh start proves each variant anew.
        self.unfit: dict[str, str] = {}
        self.starts: dict[str, deque[float]] = {}  # variant -> when its replicas started, within RESTART_WINDOW_S
        self.resume_window()
        self.apply_tiers(config, first=True)

    # -- config -------------------------------------------------------------------------------------
    def apply(self, config: Config) -> int:
        """An operator's config. It also ends a fail-safe start: applying is the operator's decision."""
        self.apply_tiers(config, first=False, version=self.version + 1, end_fail_safe=True)
        return self.version

    def apply_tiers(
        self, config: Config, *, first: bool, version: int | None = None, end_fail_safe: bool = False
    ) -> None:
        """Works on a copy, saves it, and only then makes it the state: a config that cannot be saved
        is not applied (the caller gets the error), so memory never runs ahead of the file."""
        version = version or self.version
        state = copy.deepcopy(self.state)
        changes: list[tuple[str, TierConfig, Phase]] = []
        if end_fail_safe:
            state.pop("fail_safe", None)
        for name, tier in config.tiers.items():
            record = state["tiers"].setdefault(name, {"phase": Phase.IDLE, "history": []})
            phase = Phase(record["phase"])
            enables = tier.candidate is not None and tier.weight > 0
            changed = record.get("tier_hash") != tier_hash(tier)
            if not changed:
                event = None  # the same tier config again (a re-apply, a redeploy) changes nothing
            elif phase is Phase.ROLLED_BACK and enables and not first:
                event = Event.OPERATOR_REENABLES
            elif phase is Phase.ROLLED_BACK and first:
                # A redeploy with a changed tier config is as deliberate as an apply.
                event = Event.OPERATOR_REENABLES if enables else Event.CONFIG_DISABLES
            else:
                event = Event.CONFIG_ENABLES if enables else Event.CONFIG_DISABLES
            new_phase = phase if event is None else next_phase(phase, event)
            if new_phase is Phase.PROGRESSING and tier.weight >= 100:
                new_phase = next_phase(new_phase, Event.FULLY_PROMOTED)
            if new_phase is not Phase.ROLLED_BACK:
                record["tier_hash"] = tier_hash(tier)
            else:
                changed = False  # a rolled-back tier keeps judging nothing until it is re-enabled
            if new_phase is not phase or changed:
                record["since"] = self.clock()  # judge only what happened under this tier config
                # A progression starts again from the config's weight; an operator's pause ends.
                record["live_weight"], record["step_at"] = tier.weight, self.clock()
                record.pop("paused", None)
            if new_phase is not phase:
                changes.append((name, tier, new_phase))
            record["phase"] = new_phase
            record["candidate"] = tier.candidate
        state["config"] = config.model_dump_json()
        state["version"] = version
        store.save_state(config.rollback.state_file, state)
        self.state, self.config, self.version = state, config, version
        for name, tier, phase in changes:  # told once they hold
            emit_event("Normal", PHASE_REASONS[phase], name, f"{tier.candidate or '-'} at {tier.weight:g}%")
            if phase is Phase.PROMOTED:
                self.metrics.promotions.labels(name).inc()
        self.publish_state()

    def publish_state(self) -> None:
        """The phase gauges and fail-safe flag, and a zero for every counter: a zero is data, an absent
        series is not (and increase() cannot see a series born at 1)."""
        for name, record in self.state["tiers"].items():
            for phase in Phase:
                self.metrics.rollout_phase.labels(name, phase).set(1 if phase == record["phase"] else 0)
            self.metrics.promotions.labels(name).inc(0)
            for check in checks.CHECKS:
                self.metrics.rollbacks.labels(name, check).inc(0)
        self.metrics.rollout_fail_safe.set(1 if "fail_safe" in self.state else 0)
        self.publish_weights()

    def publish_weights(self) -> None:
        """The live canary weights, once for all routers. A tier that lost its candidate (or the tier itself)
        keeps its last series, at 0: a gauge's series cannot be removed, and a stale weight would read as live."""
        live = self.weights()
        current = {(name, tier.candidate or "none"): live[name] for name, tier in self.config.tiers.items()}
        for labels in self.published_weights - current.keys():
            self.metrics.canary_weight.labels(*labels).set(0)
        for labels, weight in current.items():
            self.metrics.canary_weight.labels(*labels).set(weight)
        self.published_weights |= current.keys()

    def weights(self) -> dict[str, float]:
        live = {}
        for name, tier in self.config.tiers.items():
            phase = Phase(self.state["tiers"][name]["phase"])
            held = phase is Phase.ROLLED_BACK or "fail_safe" in self.state or tier.candidate in self.unfit
            live[name] = 0.0 if held else self.live_weight(name, tier)
        return live

    def live_weight(self, name: str, tier: TierConfig) -> float:
        """The candidate's weight as its phase and progression make it (before a rollback or fail-safe hold)."""
        if tier.progression is None:
            return tier.weight
        record = self.state["tiers"][name]
        if Phase(record["phase"]) is Phase.PROMOTED:
            return 100.0
        return float(record.get("live_weight", tier.weight))

    # -- signals ------------------------------------------------------------------------------------
    def report(self, events: list[Signal], batch: str | None = None) -> None:
        """Takes a router's signals; a batch id already taken is dropped (the router sent it again
        because it did not see the acknowledgement)."""
        if batch is not None:
            if batch in self.batches:
                return
            self.batches[batch] = None
            if len(self.batches) > MAX_BATCHES:
                self.batches.popitem(last=False)
        now = self.clock()
        current = [e for e in events if e.version == signals.VERSION]
        if len(current) < len(events):
            logger.warning(
                "dropped %d signals of another version (a redeploy in progress?)", len(events) - len(current)
            )
        self.events.extend((now, e) for e in current)
        horizon = now - self.config.rollback.window_s
        while self.events and self.events[0][0] < horizon:
            self.events.popleft()

    def take_vote(self, response_id: str) -> bool:
        """Records a feedback vote on one answer; False if it already had one, whichever router replica
        took it. Remembered only as long as feedback on the answer is accepted at all (a signed id older
        than `feedback_max_age_s` is refused before it gets here), so memory stays bounded by the votes
        of that period. Not persisted: a restarted controller would take a second vote on an answer voted
        before the restart; `window()` still counts that answer's vote once while the window holds both."""
        now = self.clock()
        horizon = now - self.config.limits.feedback_max_age_s
        while self.votes and (len(self.votes) >= MAX_VOTES or next(iter(self.votes.values())) < horizon):
            self.votes.popitem(last=False)
        if response_id in self.votes:
            return False
        self.votes[response_id] = now
        return True

    # -- the window across restarts ------------------------------------------------------------------
    def resume_window(self) -> None:
        """Takes back the signals a previous run of the controller saved, those still inside the window,
        and the ids of the batches they came in (a router sending one again is not counted twice)."""
        saved = store.load_window(store.window_path(self.config.rollback.state_file))
        horizon = self.clock() - self.config.rollback.window_s
        try:
            events = [(float(at), signals.from_json(e)) for at, e in saved.get("events", []) if at >= horizon]
        except (TypeError, KeyError, ValueError) as exc:
            logger.warning("the saved window of signals is not readable (%r); judging a fresh window", exc)
            return
        self.events.extend((at, e) for at, e in events if e.version == signals.VERSION)
        self.batches.update((batch, None) for batch in saved.get("batches", []))
        if events:
            logger.info("resumed a window of %d signals", len(self.events))

    def save_window(self, *, force: bool = False) -> bool:
        """Saves the window every `window_save_s` at most: a crash loses at most that much of it."""
        now = self.clock()
        if not force and now - self.window_saved_at < self.config.rollback.window_save_s:
            return False
        window = {
            "events": [(at, signals.to_json(e)) for at, e in self.events],
            "batches": list(self.batches)[-MAX_SAVED_BATCHES:],
        }
        try:
            store.save_window(store.window_path(self.config.rollback.state_file), window)
        except OSError:
            logger.exception("could not save the window of signals; a restart would judge a fresh one")
        self.window_saved_at = now
        return True

    def replica_started(self, signal: ReplicaStarted) -> None:
        """An engine replica's start, kept in the window (and saved with it) like any signal."""
        logger.info("replica %s of %s started at %.3f", signal.replica, signal.variant, signal.started_at)
        self.report([signal])
        self.count_start(signal)

    def count_start(self, signal: ReplicaStarted) -> None:
        """Takes a candidate whose replicas keep dying (MAX_RESTARTS) out of the rollout; a baseline is never."""
        now = self.clock()
        starts = self.starts.setdefault(signal.variant, deque())
        starts.append(now)
        while starts[0] < now - RESTART_WINDOW_S:
            starts.popleft()
        variant = self.config.variants.get(signal.variant)
        baselines = {tier.baseline for tier in self.config.tiers.values()}
        if variant is None or signal.variant in baselines or signal.variant in self.unfit:
            return
        if len(starts) - variant.most_replicas() >= MAX_RESTARTS:
            why = (
                f"unfit on this machine: its replicas started {len(starts)} times in {RESTART_WINDOW_S / 60:g} "
                f"minutes for {variant.most_replicas()} replica(s): it keeps dying after its verification passed"
            )
            self.variant_unfit(VariantUnfit(signal.variant, signal.replica, why, now))

    def variant_unfit(self, signal: VariantUnfit) -> None:
        """A variant unfit on this machine leaves every tier's rollout at once: weight 0, told once per tier."""
        if self.unfit.get(signal.variant) == signal.reason:
            return  # the replica's reminder
        self.unfit[signal.variant] = signal.reason
        for name, tier in self.config.tiers.items():
            if tier.candidate == signal.variant:
                emit_event("Warning", "Unfit", name, f"{signal.variant} out of the rollout: {signal.reason}")
        self.publish_weights()

    def warm_ups(self, tier: TierConfig, since: float) -> list[WarmUp]:
        """The replica starts of a tier's variants whose first seconds reach into what is judged."""
        exclusion = self.config.rollback.warmup_exclusion_s
        found = []
        for at, event in self.events:
            if isinstance(event, ReplicaStarted) and event.variant in (tier.baseline, tier.candidate):
                start, until = min(at, event.started_at), max(at, event.started_at) + exclusion
                if exclusion > 0 and until >= since:
                    found.append(WarmUp(event.variant, event.replica, start, until))
        return found

    def window(self, name: str, tier: TierConfig, since: float, warm_ups: list[WarmUp] | None = None) -> checks.Window:
        """What the tier's checks judge; counts into `warm_ups` (computed here if not given) the latency
        samples it left out."""
        w = checks.Window()
        voted: set[str] = set()
        if warm_ups is None:
            warm_ups = self.warm_ups(tier, since)
        for at, event in self.events:
            if at < since or isinstance(event, ReplicaStarted) or event.tier != name:
                continue
            if isinstance(event, RequestSignal):
                if event.variant == tier.candidate:
                    w.candidate_requests += 1
                    w.candidate_errors += 0 if event.ok else 1
                    ttfts, tpots = w.candidate_ttfts, w.candidate_tpots
                elif event.variant == tier.baseline:
                    w.baseline_requests += 1
                    ttfts, tpots = w.baseline_ttfts, w.baseline_tpots
                else:
                    continue
                warming = next((u for u in warm_ups if u.variant == event.variant and u.start <= at <= u.until), None)
                if warming is not None:  # its errors count; its latency may be a cold replica's
                    warming.samples += event.ok and (event.ttft_s is not None or event.tpot_s is not None)
                    continue
                if event.ok and event.ttft_s is not None:
                    ttfts.append(event.ttft_s)
                if event.ok and event.tpot_s is not None:
                    tpots.append(event.tpot_s)
            elif isinstance(event, ComparisonSignal):
                if event.pair == "noise_floor":
                    w.floor_disagreements.append(event.disagree)
                    if event.drift is not None:
                        w.floor_drifts.append(event.drift)
                elif event.primary == tier.candidate:
                    w.disagreements.append(event.disagree)
                    if event.drift is not None:
                        w.drifts.append(event.drift)
            elif isinstance(event, FeedbackSignal):
                if event.response_id in voted:  # one vote per answer, whichever router replica took it
                    continue
                voted.add(event.response_id)
                if event.overridden and event.variant == tier.candidate:
                    w.candidate_overrides += 1
                elif event.overridden and event.variant == tier.baseline:
                    w.baseline_overrides += 1
        # Votes on answers from before the window must not outnumber the answers in it: a rate stays a rate.
        w.candidate_overrides = min(w.candidate_overrides, w.candidate_requests)
        w.baseline_overrides = min(w.baseline_overrides, w.baseline_requests)
        return w

    # -- judging ------------------------------------------------------------------------------------
    def thresholds(self) -> checks.Thresholds:
        r = self.config.rollback
        return checks.Thresholds(
            min_samples=r.min_samples,
            confidence_z=r.confidence_z,
            max_error_rate=r.max_error_rate,
            latency_quantile=r.latency_quantile,
            max_latency_ratio=r.max_latency_ratio,
            max_disagreement_rate=r.max_disagreement_rate,
            max_score_drift=r.max_score_drift,
            max_override_rate_delta=r.max_override_rate_delta,
        )

    def evaluate(self) -> list[str]:
        """Judges every tier with a live candidate; returns the tiers rolled back by this evaluation."""
        tripped = []
        thresholds = self.thresholds()
        for name, tier in self.config.tiers.items():
            record = self.state["tiers"][name]
            if tier.candidate is None or Phase(record["phase"]) not in (Phase.PROGRESSING, Phase.PROMOTED):
                continue
            since = record.get("since", 0.0)
            warm_ups = self.warm_ups(tier, since)
            verdicts = checks.evaluate(self.window(name, tier, since, warm_ups), thresholds)
            self.latest[name] = [asdict(v) for v in verdicts]
            self.left_out[name] = [asdict(u) for u in warm_ups]
            failed = [v for v in verdicts if v.failed]
            if failed:
                self.roll_back(name, tier, failed)
                tripped.append(name)
            elif tier.progression is not None and Phase(record["phase"]) is Phase.PROGRESSING:
                self.progress(name, tier, verdicts)
        return tripped

    def progress(self, name: str, tier: TierConfig, verdicts: list[checks.Verdict]) -> None:
        """One step of a progression, once a whole interval passed since the last with no check failing
        and with enough candidate requests in the window to judge its error rate (no evidence is no pass)."""
        assert tier.progression is not None
        record = self.state["tiers"][name]
        now = self.clock()
        if "paused" in record or "fail_safe" in self.state:
            return
        if now < step_due_at(record, tier.progression):
            return
        if not any(v.check == "error_rate" and v.value is not None for v in verdicts):
            return
        before = self.live_weight(name, tier)
        state = copy.deepcopy(self.state)
        changed = state["tiers"][name]
        after = next_weight(tier.progression, before)
        # Reaching 100 promotes, whether by the step past max_weight or by a step that lands on 100
        # (max_weight: 100): one event, one count, never a "promoted" step that leaves it progressing.
        kind = "promoted" if after >= 100.0 else "step"
        if kind == "promoted":
            changed["phase"] = next_phase(Phase.PROGRESSING, Event.FULLY_PROMOTED)
        changed["live_weight"] = after
        changed["step_at"] = now
        event = {"at": now, "kind": kind, "by": "controller", "candidate": tier.candidate}
        changed["history"] = [*changed.get("history", []), {**event, "weight_before": before, "weight_after": after}]
        changed["history"] = changed["history"][-MAX_HISTORY:]
        try:
            store.save_state(self.config.rollback.state_file, state)
        except OSError:  # a higher weight is not the safe side: no step that a restart would forget
            logger.exception("could not save a progression step of tier %s; it is tried again", name)
            return
        self.state = state
        self.publish_state()
        if kind == "promoted":
            self.metrics.promotions.labels(name).inc()
            emit_event("Normal", "Promoted", name, f"{tier.candidate} {before:g}% -> 100% after every check passed")
        else:
            emit_event("Normal", "Progressing", name, f"{tier.candidate} {before:g}% -> {after:g}%")

    def operate(self, name: str, action: str, by: str) -> dict[str, Any]:
        """An operator's `pause`, `resume` or `abort` of a tier's rollout, recorded with who asked.
        Paused: no further steps (checks still roll back). Aborted: rolled back now, as a failed check would."""
        if name not in self.config.tiers:
            raise ValueError(f"no tier {name!r}; the tiers are {', '.join(sorted(self.config.tiers))}")
        tier = self.config.tiers[name]
        state = copy.deepcopy(self.state)
        record = state["tiers"][name]
        phase = Phase(record["phase"])
        now = self.clock()
        if action == "pause":
            if tier.progression is None or phase is not Phase.PROGRESSING:
                raise ValueError(f"tier {name} is {phase} and not progressing by steps: there is nothing to pause")
            if "paused" in record:
                raise ValueError(f"tier {name} is already paused (by {record['paused']['by']})")
            record["paused"] = {"by": by, "at": now}
        elif action == "resume":
            if "paused" not in record:
                raise ValueError(f"tier {name} is not paused")
            del record["paused"]
            record["step_at"] = now  # a whole passing interval from now before the next step
        elif action == "abort":
            if phase not in (Phase.PROGRESSING, Phase.PROMOTED):
                raise ValueError(f"tier {name} is {phase}: there is no live candidate to abort")
            record["phase"] = next_phase(phase, Event.OPERATOR_ABORTS)
            record.pop("paused", None)
        else:
            raise ValueError(f"unknown action {action!r}; pause, resume or abort")
        weight = self.live_weight(name, tier)
        event = {"at": now, "kind": action, "by": by, "candidate": tier.candidate, "weight_before": weight}
        record["history"] = [*record.get("history", []), event][-MAX_HISTORY:]
        try:
            store.save_state(self.config.rollback.state_file, state)
        except OSError:
            if action != "abort":
                raise
            logger.exception("could not save the abort of tier %s; it holds until the controller restarts", name)
        self.state = state
        self.publish_state()
        reason = {"pause": "Paused", "resume": "Resumed", "abort": "Aborted"}[action]
        emit_event(
            "Warning" if action == "abort" else "Normal", reason, name, f"{tier.candidate} at {weight:g}% by {by}"
        )
        return self.status().tiers[name].model_dump(mode="json")

    def roll_back(self, name: str, tier: TierConfig, failed: list[checks.Verdict]) -> None:
        state = copy.deepcopy(self.state)
        record = state["tiers"][name]
        phase_before = Phase(record["phase"])
        record["phase"] = next_phase(phase_before, Event.CHECK_FAILED)
        tripped_at = self.clock()
        event = {
            "at": tripped_at,
            "kind": "rollback",
            "by": "controller",
            "phase_before": str(phase_before),  # progressing (at any step of a progression) or promoted
            "tier": name,
            "candidate": tier.candidate,
            "baseline": tier.baseline,
            "weight_before": self.live_weight(name, tier),
            "reasons": [v.check for v in failed],
            "values": {v.check: v.value for v in failed},
            "thresholds": {v.check: v.threshold for v in failed},
            "samples": {v.check: v.samples for v in failed},
            "window_s": self.config.rollback.window_s,
            "since": record.get("since"),
        }
        record["history"] = [*record.get("history", []), event][-MAX_HISTORY:]
        try:
            store.save_state(self.config.rollback.state_file, state)
        except OSError:
            # The rollback still happens: a candidate at 0 is the safe side. Only a restart would lose it.
            logger.exception("could not save the rollback of tier %s; it holds until the controller restarts", name)
        # From this line on every router poll gets weight 0 (`weights()` reads the phase).
        self.state = state
        for reason in event["reasons"]:
            self.metrics.rollbacks.labels(name, reason).inc()
        self.publish_state()
        why = ", ".join(
            f"{v.check} {v.value:.4f} > {v.threshold} (n={v.samples})" for v in failed if v.value is not None
        )
        emit_event("Warning", "RolledBack", name, f"{tier.candidate} {event['weight_before']:g}% -> 0: {why}")

    def snapshot(self, known_version: int) -> Snapshot:
        return Snapshot(
            version=self.version,
            config=None if known_version == self.version else self.config.model_dump_json(),
            weights=self.weights(),
            secret=self.state["secret"],
            fail_safe=self.state.get("fail_safe"),
            unfit=dict(self.unfit),
        )

    def status(self) -> RolloutStatus:
        weights = self.weights()
        return RolloutStatus(
            config_version=self.version,
            fail_safe=self.state.get("fail_safe"),
            interval_s=self.config.rollback.interval_s,
            tiers={
                name: TierStatus(
                    phase=self.state["tiers"][name]["phase"],
                    baseline=tier.baseline,
                    candidate=tier.candidate,
                    unfit=self.unfit.get(tier.candidate) if tier.candidate else None,
                    configured_weight=tier.weight,
                    live_weight=weights[name],
                    progression=tier.progression.model_dump() if tier.progression else None,
                    next_step=self.next_step(name, tier),
                    paused=self.state["tiers"][name].get("paused"),
                    checks=self.latest.get(name, []),
                    left_out=self.left_out.get(name, []),
                    history=self.state["tiers"][name].get("history", []),
                )
                for name, tier in self.config.tiers.items()
            },
        )

    def next_step(self, name: str, tier: TierConfig) -> dict[str, float] | None:
        """The weight of a progression's next step and the earliest time it may happen (if every check passes)."""
        record = self.state["tiers"][name]
        progression = tier.progression
        if progression is None or Phase(record["phase"]) is not Phase.PROGRESSING or "paused" in record:
            return None
        return {
            "weight": next_weight(progression, self.live_weight(name, tier)),
            "at": step_due_at(record, progression),
        }


@ray.remote(num_cpus=0)
class RolloutController:
    """The actor around `Rollout`: named and detached, so routers and `serving apply` find it and it
    outlives router restarts; it judges on its own loop."""

    def __init__(self, config_json: str, recover: bool = False) -> None:
        # `recover`: a router starts this controller in place of one that died for good, so the state
        # file's last applied config wins over the deploy-time config the router holds, as on a restart.
        restarted = recover or ray.get_runtime_context().was_current_actor_reconstructed
        self.metrics = ControllerMetrics(ActorExport())
        self.rollout = Rollout(Config.model_validate_json(config_json), restarted=restarted, metrics=self.metrics)
        if restarted:
            logger.warning("rollout controller restarted; config version %d restored", self.rollout.version)
        self.loop_started = False
        self.drain = DrainBook()  # on shutdown: not rollout state, but the one place every router replica syncs with

    async def ensure_loop(self) -> None:
        if not self.loop_started:
            self.loop_started = True
            asyncio.get_running_loop().create_task(self.judge_forever())

    async def judge_forever(self) -> None:
        while True:
            try:
                if self.rollout.config.rollback.enabled:
                    self.rollout.evaluate()
                    self.rollout.save_window()
                self.metrics.last_evaluation.set(time.time())  # what the controller-not-judging alert reads
            except Exception:
                logger.exception("rollout evaluation failed")
            await asyncio.sleep(self.rollout.config.rollback.interval_s)

    async def snapshot(self, known_version: int) -> Snapshot:
        await self.ensure_loop()
        return self.rollout.snapshot(known_version)

    async def report(self, events: list[Signal], batch: str | None = None) -> None:
        self.rollout.report(events, batch)

    async def take_vote(self, response_id: str) -> bool:
        return self.rollout.take_vote(response_id)

    async def replica_started(self, signal: ReplicaStarted) -> None:
        self.rollout.replica_started(signal)

    async def variant_unfit(self, signal: VariantUnfit) -> None:
        self.rollout.variant_unfit(signal)

    async def apply(self, config_json: str) -> int:
        return self.rollout.apply(Config.model_validate_json(config_json))

    async def operate(self, tier: str, action: str, by: str) -> dict[str, Any]:
        return self.rollout.operate(tier, action, by)

    async def status(self) -> dict[str, Any]:
        return self.rollout.status().model_dump(mode="json")  # the wire form: `serving rollout status --json`

    # -- the drain on shutdown (serving.route.drain) --------------------------------------------------------
    async def begin_drain(self) -> None:
        self.drain.begin()

    async def drain_report(self, report: RouterReport) -> bool:
        return self.drain.report(report)

    async def drain_status(self) -> DrainStatus:
        return self.drain.status()


def controller(config_json: str | None = None, *, recover: bool = False) -> Any:
    """The controller actor, created from `config_json` if it does not exist yet (`recover`: in place of
    one that died, restoring the last applied config from the state file)."""
    if config_json is None:
        return ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
    # max_restarts: Ray restarts a controller that dies; it comes back from the state file.
    return RolloutController.options(  # type: ignore[attr-defined]
        name=CONTROLLER_NAME,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        max_task_retries=3,
    ).remote(config_json, recover)


async def announce_unfit(
    signal: VariantUnfit, lookup: Callable[[], Any] = controller, *, tries: int = 60, pause_s: float = 2.0
) -> bool:
    """Tells the rollout controller that a variant is unfit on this machine; retried like `announce_started`."""

    async def deliver() -> None:
        handle = await asyncio.to_thread(lookup)
        await handle.variant_unfit.remote(signal)

    return await deliver_with_retries(deliver, f"{signal.variant} is unfit", tries=tries, pause_s=pause_s)


async def deliver_with_retries(
    deliver: Callable[[], Any], what: str, *, tries: int, pause_s: float, timeout_s: float = 10.0
) -> bool:
    """Runs `deliver` until it succeeds (there may be no controller yet: on a first deploy the engines may be
    ready before a router creates it), then gives up with a warning."""
    last: Exception | None = None
    for _ in range(tries):
        try:
            await asyncio.wait_for(deliver(), timeout_s)
            return True
        except Exception as exc:  # not there yet, restarting, or a timeout: try again
            last = exc
        await asyncio.sleep(pause_s)
    logger.warning("could not tell the rollout controller that %s: %r", what, last)
    return False


async def announce_started(
    signal: ReplicaStarted,
    lookup: Callable[[], Any] = controller,
    *,
    tries: int = 60,
    pause_s: float = 2.0,
    timeout_s: float = 10.0,
) -> bool:
    """Tells the rollout controller that an engine replica started. Best effort, run beside the replica (never
    in its way): tried again while there is no controller yet (on a first deploy the engines may be ready before
    a router creates it), then given up with a warning; the checks' confidence bounds are the fallback."""

    async def deliver() -> None:
        handle = await asyncio.to_thread(lookup)  # Ray's actor lookup blocks
        await handle.replica_started.remote(signal)

    return await deliver_with_retries(
        deliver, f"{signal.replica} started", tries=tries, pause_s=pause_s, timeout_s=timeout_s
    )
