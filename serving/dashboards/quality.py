"""The Quality dashboard: what the shadow comparisons and feedback say about each candidate, each signal
beside the rollback threshold it is judged against, and the rollout's phase.

Quality signals are rare (a few comparisons a minute), so they are read over the rollout's own window
(`rollback.window_s`), not Grafana's rate interval: the panel shows what the controller judges.
"""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as dashboard_builders
from grafana_foundation_sdk.builders import timeseries

from serving.config import RollbackConfig
from serving.dashboards.panels import PRIMARY, PRIMARY_ROLE, TIER, VARIANT, Query, panel, row

PHASE_CODES = {"idle": 0, "progressing": 1, "promoted": 2, "rolled_back": 3}


def candidate_as(label: str) -> str:
    """Each tier's candidate, as a series labelled {tier, <label>} (from the live canary weight)."""
    weights = f"max by (tier, candidate) (ray_serving_canary_weight_percent{{{TIER}}})"
    return f'label_replace({weights}, "{label}", "$1", "candidate", "(.+)")'


def ratio(numerator: str, denominator: str, by: str, selector: str, window: str) -> str:
    """sum(rate(numerator)) / sum(rate(denominator)) by the labels `by`, both over `window`. A numerator
    counted only at an event (a disagreement) has no series until its first one: 0 where the denominator
    has data, so a pair that always agreed reads 0, not "no data"."""
    below = f"sum by ({by}) (rate({denominator}{{{selector}}}[{window}]))"
    return f"(sum by ({by}) (rate({numerator}{{{selector}}}[{window}])) or 0 * {below}) / {below}"


CANDIDATE_PAIRS = f'kind="candidate", {TIER}, {PRIMARY}'
NOISE_FLOOR = f'kind="noise_floor", {TIER}'
CANDIDATES = f'kind="candidate", {TIER}'  # not narrowed by $variant: a tier's candidate is judged whole


def per_pair(numerator: str, denominator: str, window: str) -> tuple[str, str]:
    """(candidate pairs by tier, primary and shadow; the noise floor by tier)."""
    return (
        ratio(numerator, denominator, "tier, primary, shadow", CANDIDATE_PAIRS, window),
        ratio(numerator, denominator, "tier", NOISE_FLOOR, window),
    )


def above_floor(numerator: str, denominator: str, window: str) -> str:
    """The candidate's ratio over the window minus the tier's noise floor (0 where no floor was sampled),
    for the tier's candidate only: what the disagreement and drift checks compare with their thresholds."""
    candidate = (
        f"({ratio(numerator, denominator, 'tier, primary', CANDIDATES, window)})"
        f" and on (tier, primary) {candidate_as('primary')}"
    )
    floor = (
        f"({ratio(numerator, denominator, 'tier', NOISE_FLOOR, window)})"
        f" or (0 * max by (tier) (ray_serving_canary_weight_percent{{{TIER}}}))"
    )
    return f"({candidate}) - on (tier) group_left () ({floor})"


def override_rate(window: str) -> str:
    """Overturned answers over answered requests, by tier and variant: what the override check compares.
    A variant nobody overturned has no override series yet: its rate is 0, not missing (it is the
    baseline the candidate's rate is compared with)."""
    answered_selector = f'{PRIMARY_ROLE}, outcome!="rejected", {TIER}'
    answered = f"sum by (tier, variant) (rate(ray_serving_requests_total{{{answered_selector}}}[{window}]))"
    overridden = f'sum by (tier, variant) (rate(ray_serving_overrides_total{{kind="feedback", {TIER}}}[{window}]))'
    return f"(({overridden} or 0 * {answered}) / {answered})"


def build(rollback: RollbackConfig) -> list[dashboard_builders.Row | timeseries.Panel]:
    """The rows and panels, in order; the dashboard's grid follows it."""
    window = f"{round(rollback.window_s)}s"
    over = f"over the rollout's window ({window})"
    disagreements = ("ray_serving_shadow_disagreements_total", "ray_serving_shadow_comparisons_total")
    drifts = ("ray_serving_score_drift_sum", "ray_serving_score_drift_count")
    disagreement_pairs, disagreement_floor = per_pair(*disagreements, window)
    drift_pairs, drift_floor = per_pair(*drifts, window)
    agreement_pairs, agreement_floor = per_pair(
        "ray_serving_token_agreement_ratio_sum", "ray_serving_token_agreement_ratio_count", window
    )
    candidate = candidate_as("variant")
    samples = (
        f"sum by (tier, primary, kind) (increase(ray_serving_shadow_comparisons_total{{{TIER}, {PRIMARY}}}[{window}]))"
    )
    phase = " + ".join(
        f'{code} * max by (tier) (ray_serving_rollout_phase{{phase="{name}", {TIER}}})'
        for name, code in PHASE_CODES.items()
    )
    return [
        row("Disagreement"),
        panel(
            "Disagreement rate by pair, and the noise floor",
            f"Share of shadowed answers whose normalized text differs from the shadow's, {over}, by tier and "
            "pair (primary vs shadow), and the noise floor: the same variant paired with itself, which "
            "disagrees too when sampling temperature is above 0.",
            "percentunit",
            [
                Query(disagreement_pairs, "{{tier}}: {{primary}} vs {{shadow}}"),
                Query(disagreement_floor, "{{tier}}: noise floor"),
            ],
            minimum=0,
        ),
        panel(
            "Candidate disagreement above the noise floor",
            f"Each tier's candidate: disagreement rate minus the noise floor, {over}. Red: the rollback threshold "
            f"max_disagreement_rate ({rollback.max_disagreement_rate}); orange: 80 % of it, where the alert warns. "
            "The controller judges the Wilson lower bound of the rate, so it trips later than the raw rate crosses.",
            "percentunit",
            [
                Query(
                    above_floor(*disagreements, window),
                    "{{tier}}: {{primary}}",
                )
            ],
            threshold=rollback.max_disagreement_rate,
        ),
        row("Score drift"),
        panel(
            "Score drift by pair, and the noise floor",
            f"Mean |delta log-prob| per token of the primary's answer, teacher-forced through both variants, {over}: "
            "how differently two precisions judge the same answer, whatever the temperature. Noise floor: a "
            "variant against itself.",
            "none",
            [Query(drift_pairs, "{{tier}}: {{primary}} vs {{shadow}}"), Query(drift_floor, "{{tier}}: noise floor")],
            minimum=0,
        ),
        panel(
            "Candidate score drift above the noise floor",
            f"Each tier's candidate: mean drift per token minus the noise floor's, {over}. Red: the rollback "
            f"threshold max_score_drift ({rollback.max_score_drift}); orange: 80 % of it, where the alert warns.",
            "none",
            [Query(above_floor(*drifts, window), "{{tier}}: {{primary}}")],
            threshold=rollback.max_score_drift,
        ),
        row("Token agreement and samples"),
        panel(
            "Token agreement by pair, and the noise floor",
            f"Mean share of output token positions where primary and shadow agree, {over}. No rollback check reads "
            "it: it says how far apart two answers are once they differ.",
            "percentunit",
            [
                Query(agreement_pairs, "{{tier}}: {{primary}} vs {{shadow}}"),
                Query(agreement_floor, "{{tier}}: noise floor"),
            ],
            minimum=0,
        ),
        panel(
            "Comparisons in the rollout's window",
            f"Shadow comparisons {over}, by tier, primary and kind. A check judges only once its window holds "
            f"min_samples ({rollback.min_samples}, the line); below it, no rollback can trip.",
            "short",
            [
                Query(
                    samples,
                    "{{tier}}: {{primary}} {{kind}}",
                )
            ],
            threshold=rollback.min_samples,
            above_is_bad=False,
            minimum=0,
        ),
        row("Feedback overrides"),
        panel(
            "Feedback override rate by variant and tier",
            f"Share of answered requests that a person overturned (POST /v1/feedback with overridden=true), {over}, "
            "by the variant that answered and tier.",
            "percentunit",
            [
                Query(
                    # $variant narrows by the variant that answered
                    f"{override_rate(window)} and on (tier, variant) max by (tier, variant)"
                    f" (ray_serving_requests_total{{{VARIANT}}})",
                    "{{variant}} / {{tier}}",
                )
            ],
            minimum=0,
        ),
        panel(
            "Candidate override rate minus the baseline's",
            f"Each tier's candidate override rate minus the other variants' in the tier (its baseline), {over}. "
            f"Red: the rollback threshold max_override_rate_delta ({rollback.max_override_rate_delta}); orange: 80 % "
            "of it.",
            "percentunit",
            [
                Query(
                    f"max by (tier) ({override_rate(window)} and on (tier, variant) {candidate})"
                    f" - on (tier) max by (tier) ({override_rate(window)} unless on (tier, variant) {candidate})",
                    "{{tier}}",
                )
            ],
            threshold=rollback.max_override_rate_delta,
        ),
        row("Rollout"),
        panel(
            "Rollout phase by tier",
            "The phase of each tier's rollout: 0 idle, 1 progressing, 2 promoted, 3 rolled back. A rolled-back "
            "candidate stays at weight 0 until an operator applies a config that changes the tier.",
            "none",
            [Query(phase, "{{tier}}")],
            width=8,
            minimum=0,
        ),
        panel(
            "Canary weight by tier",
            "The live share of each tier's users sent to its candidate. Rollbacks and promotions are annotated.",
            "percent",
            [
                Query(
                    f"max by (tier, candidate) (ray_serving_canary_weight_percent{{{TIER}}})", "{{tier}}: {{candidate}}"
                )
            ],
            width=8,
            minimum=0,
        ),
        panel(
            "Rollout controller fail-safe",
            "1 while the rollout controller holds every candidate at weight 0 because its state file could not be "
            "read (the ServingRolloutFailSafe alert pages on it). `serving rollout status` says why.",
            "bool",
            [Query("max(ray_serving_rollout_fail_safe)", "fail-safe")],
            width=8,
            minimum=0,
        ),
    ]
