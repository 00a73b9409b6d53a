"""Pure checks of one tier's candidate over a window of signals. No Ray, no clock: the controller
passes the window in and gets verdicts back.

Rates are judged by a Wilson score bound: a check trips only when even the *lower* bound of the
candidate's rate is over the threshold, so a small canary does not trip by chance; and with more
samples the bound tightens, so a real regression cannot hide for long.

Latency is judged on what a precision changes, time to first token and time per output token (not
end-to-end latency, which grows with the answer's length), at a quantile q (`latency_quantile`), with
distribution-free bounds from order statistics: the number of samples below the true quantile is
Binomial(n, q), so the order statistics at ranks n*q -/+ z*sqrt(n*q*(1-q)) bound it. A latency check
trips only when the *lower* bound of the candidate's quantile exceeds `max_latency_ratio` times the
*upper* bound of the baseline's. The bounds exist only once n is large enough for the quantile: about
140 samples at p95 and 900 at p99 with z = 2.576; below that the check does not judge.
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


def quantile_bounds(values: Sequence[float], q: float, z: float) -> tuple[float, float] | None:
    """A confidence interval for the q-quantile of the distribution `values` were drawn from, from their
    order statistics (normal approximation of the binomial rank); None when there are too few values."""
    n = len(values)
    centre, spread = n * q, z * math.sqrt(n * q * (1 - q))
    low_rank, high_rank = math.floor(centre - spread), math.ceil(centre + spread) + 1  # 1-based ranks
    if low_rank < 1 or high_rank > n:
        return None
    ordered = sorted(values)
    return ordered[low_rank - 1], ordered[high_rank - 1]


@dataclass(frozen=True)
class Thresholds:
    min_samples: int
    confidence_z: float
    max_error_rate: float
    latency_quantile: float
    max_latency_ratio: float
    max_disagreement_rate: float  # above the noise floor
    max_score_drift: float  # above the noise floor's drift
    max_override_rate_delta: float


@dataclass
class Window:
    """What the routers reported for one tier inside the window."""

    candidate_ttfts: list[float] = field(default_factory=list)  # time to first token, streamed answers
    baseline_ttfts: list[float] = field(default_factory=list)
    candidate_tpots: list[float] = field(default_factory=list)  # time per output token
    baseline_tpots: list[float] = field(default_factory=list)
    candidate_errors: int = 0
    candidate_requests: int = 0
    baseline_requests: int = 0
    disagreements: list[bool] = field(default_factory=list)  # candidate vs shadow target
    drifts: list[float] = field(default_factory=list)
    floor_disagreements: list[bool] = field(default_factory=list)  # a variant against itself
    floor_drifts: list[float] = field(default_factory=list)
    candidate_overrides: int = 0
    baseline_overrides: int = 0


CHECKS = ("error_rate", "ttft_ratio", "tpot_ratio", "disagreement", "score_drift", "override_rate")


@dataclass(frozen=True)
class Verdict:
    check: str  # error_rate | ttft_ratio | tpot_ratio | disagreement | score_drift | override_rate
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

    verdicts.append(latency_verdict("ttft_ratio", window.candidate_ttfts, window.baseline_ttfts, t))
    verdicts.append(latency_verdict("tpot_ratio", window.candidate_tpots, window.baseline_tpots, t))

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


def latency_verdict(check: str, candidate: Sequence[float], baseline: Sequence[float], t: Thresholds) -> Verdict:
    """Trips when the candidate's quantile is surely above `max_latency_ratio` times the baseline's: the
    value is the lower bound of the candidate's quantile over the upper bound of the baseline's."""
    n = min(len(candidate), len(baseline))
    slow = quantile_bounds(candidate, t.latency_quantile, t.confidence_z)
    fast = quantile_bounds(baseline, t.latency_quantile, t.confidence_z)
    if n < t.min_samples or slow is None or fast is None or fast[1] <= 0:
        return Verdict(check, None, t.max_latency_ratio, n, False)
    ratio = slow[0] / fast[1]
    return Verdict(check, ratio, t.max_latency_ratio, n, ratio > t.max_latency_ratio)
