"""Every metric of the router, declared once. One prefix (`serving_`), base units, `_total` only on
counters, small fixed label sets. Ratios are computed in PromQL, not exported; each declaration
carries the query that reads it.

The registry is passed in, so tests read samples with `registry.get_sample_value(...)`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
RATIO_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
DRIFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        # histogram_quantile(0.99,
        #   sum by (le, variant) (rate(serving_request_duration_seconds_bucket{role="primary"}[5m])))
        self.request_duration = Histogram(
            "serving_request_duration_seconds",
            "End-to-end latency of a variant call, as the router sees it",
            ["variant", "tier", "role"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        # histogram_quantile(0.99, sum by (le, variant) (rate(serving_time_to_first_token_seconds_bucket[5m])))
        self.time_to_first_token = Histogram(
            "serving_time_to_first_token_seconds",
            "Time until the first token of a streamed answer (not recorded for whole answers)",
            ["variant", "tier", "role"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        # histogram_quantile(0.5, sum by (le, variant) (rate(serving_time_per_output_token_seconds_bucket[5m])))
        self.time_per_output_token = Histogram(
            "serving_time_per_output_token_seconds",
            "Time per output token after the first, from the engine's token counts",
            ["variant", "tier", "role"],
            buckets=PER_TOKEN_BUCKETS,
            registry=registry,
        )
        # sum by (variant) (rate(serving_requests_total{outcome!="ok"}[5m]))
        #   / sum by (variant) (rate(serving_requests_total[5m]))
        self.requests = Counter(
            "serving_requests_total",
            "Requests by the variant that served them and outcome",
            ["variant", "tier", "role", "outcome"],
            registry=registry,
        )
        # sum by (variant, direction) (rate(serving_tokens_total[5m]))
        self.tokens = Counter(
            "serving_tokens_total",
            "Prompt (in) and completion (out) tokens",
            ["variant", "tier", "direction"],
            registry=registry,
        )
        # rate(serving_shadow_disagreements_total[5m]) / rate(serving_shadow_comparisons_total[5m])
        self.shadow_comparisons = Counter(
            "serving_shadow_comparisons_total",
            "Compared primary/shadow pairs; kind=noise_floor pairs a variant with itself",
            ["tier", "primary", "shadow", "kind"],
            registry=registry,
        )
        self.shadow_disagreements = Counter(
            "serving_shadow_disagreements_total",
            "Pairs whose normalized outputs differ",
            ["tier", "primary", "shadow", "kind"],
            registry=registry,
        )
        # sum(rate(serving_token_agreement_ratio_sum[5m])) / sum(rate(serving_token_agreement_ratio_count[5m]))
        self.token_agreement = Histogram(
            "serving_token_agreement_ratio",
            "Share of output token positions where primary and shadow agree",
            ["tier", "primary", "shadow", "kind"],
            buckets=RATIO_BUCKETS,
            registry=registry,
        )
        # rate(serving_score_drift_sum[5m]) / rate(serving_score_drift_count[5m])
        self.score_drift = Histogram(
            "serving_score_drift",
            "Mean |delta log-prob| per token of the primary's output, teacher-forced",
            ["tier", "primary", "shadow", "kind"],
            buckets=DRIFT_BUCKETS,
            registry=registry,
        )
        # sum by (variant, kind) (rate(serving_overrides_total[5m]))
        self.overrides = Counter(
            "serving_overrides_total",
            "Routing pins (kind=routing) and people overturning answers (kind=feedback)",
            ["variant", "tier", "kind"],
            registry=registry,
        )
        # sum by (variant, tier) (rate(serving_feedback_total[5m]))
        self.feedback = Counter(
            "serving_feedback_total",
            "Feedback received on answers, overturned or not",
            ["variant", "tier"],
            registry=registry,
        )
        # sum by (tier, reason) (rate(serving_shadow_dropped_total[5m]))
        self.shadow_dropped = Counter(
            "serving_shadow_dropped_total",
            "Shadow requests dropped instead of queued",
            ["tier", "reason"],
            registry=registry,
        )
        # sum by (tier, reason) (increase(serving_rollbacks_total[1h]))
        self.rollbacks = Counter(
            "serving_rollbacks_total",
            "Automatic rollbacks of a tier's candidate, by the check that tripped",
            ["tier", "reason"],
            registry=registry,
        )
        # serving_rollout_phase == 1
        self.rollout_phase = Gauge(
            "serving_rollout_phase",
            "1 for the tier's current rollout phase, 0 for the others",
            ["tier", "phase"],
            registry=registry,
        )
        # max(serving_rollout_fail_safe) == 1   (page: canaries are held at 0 until an operator applies a config)
        self.rollout_fail_safe = Gauge(
            "serving_rollout_fail_safe",
            "1 while the rollout controller holds every candidate at 0 after a damaged state file",
            registry=registry,
        )
        # serving_canary_weight_percent
        self.canary_weight = Gauge(
            "serving_canary_weight_percent",
            "Live canary weight of the tier's candidate",
            ["tier", "candidate"],
            registry=registry,
        )
