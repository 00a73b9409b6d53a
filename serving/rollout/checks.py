"""Pure checks of one tier's candidate over a window of signals. No Ray, no clock: the controller
passes the window in and gets verdicts back.

Rates are judged by a Wilson score bound: a check trips only when even the *lower* bound of the
candidate's rate is over the threshold, so a small canary does not trip by chance; and with more
samples the bound tightens, so a real regression cannot hide for long.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field


def wilson_bounds(successes: int, n: int, z: float) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    margin = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - margin), min(1.0, centre + margin)


def p99(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


@dataclass(frozen=True)
class Thresholds:
    min_samples: int
    confidence_z: float
    max_error_rate: float
    max_p99_latency_ratio: float
    max_disagreement_rate: float  # above the noise floor
    max_score_drift: float  # above the noise floor's drift
    max_override_rate_delta: float


@dataclass
class Window:
    """What the routers reported for one tier inside the window."""

    candidate_latencies: list[float] = field(default_factory=list)
    baseline_latencies: list[float] = field(default_factory=list)
    candidate_errors: int = 0
    candidate_requests: int = 0
    baseline_requests: int = 0
    disagreements: list[bool] = field(default_factory=list)  # candidate vs shadow target
    drifts: list[float] = field(default_factory=list)
    floor_disagreements: list[bool] = field(default_factory=list)  # a variant against itself
    floor_drifts: list[float] = field(default_factory=list)
    candidate_overrides: int = 0
    baseline_overrides: int = 0


@dataclass(frozen=True)
class Verdict:
    check: str  # error_rate | p99_latency_ratio | disagreement | score_drift | override_rate
    value: float | None  # None when the window holds too few samples to judge
    threshold: float
    samples: int
    failed: bool


def evaluate(window: Window, t: Thresholds) -> list[Verdict]:
    verdicts = []

    n = window.candidate_requests
    if n >= t.min_samples:
        low, _ = wilson_bounds(window.candidate_errors, n, t.confidence_z)
        verdicts.append(Verdict("error_rate", low, t.max_error_rate, n, low > t.max_error_rate))
    else:
        verdicts.append(Verdict("error_rate", None, t.max_error_rate, n, False))

    n = min(len(window.candidate_latencies), len(window.baseline_latencies))
    if n >= t.min_samples and p99(window.baseline_latencies) > 0:
        ratio = p99(window.candidate_latencies) / p99(window.baseline_latencies)
        verdicts.append(
            Verdict("p99_latency_ratio", ratio, t.max_p99_latency_ratio, n, ratio > t.max_p99_latency_ratio)
        )
    else:
        verdicts.append(Verdict("p99_latency_ratio", None, t.max_p99_latency_ratio, n, False))

    n = len(window.disagreements)
    floor = sum(window.floor_disagreements) / len(window.floor_disagreements) if window.floor_disagreements else 0.0
    if n >= t.min_samples:
        low, _ = wilson_bounds(sum(window.disagreements), n, t.confidence_z)
        excess = low - floor
        verdicts.append(Verdict("disagreement", excess, t.max_disagreement_rate, n, excess > t.max_disagreement_rate))
    else:
        verdicts.append(Verdict("disagreement", None, t.max_disagreement_rate, n, False))

    n = len(window.drifts)
    if n >= t.min_samples:
        floor_drift = sum(window.floor_drifts) / len(window.floor_drifts) if window.floor_drifts else 0.0
        excess = sum(window.drifts) / n - floor_drift
        verdicts.append(Verdict("score_drift", excess, t.max_score_drift, n, excess > t.max_score_drift))
    else:
        verdicts.append(Verdict("score_drift", None, t.max_score_drift, n, False))

    n = min(window.candidate_requests, window.baseline_requests)
    if n >= t.min_samples:
        delta = (window.candidate_overrides / window.candidate_requests) - (
            window.baseline_overrides / window.baseline_requests
        )
        verdicts.append(
            Verdict("override_rate", delta, t.max_override_rate_delta, n, delta > t.max_override_rate_delta)
        )
    else:
        verdicts.append(Verdict("override_rate", None, t.max_override_rate_delta, n, False))
    return verdicts
