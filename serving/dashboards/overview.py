"""The Overview dashboard: traffic, errors, latency, canary weights, shadow drops, escalations and the engines."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as dashboard_builders
from grafana_foundation_sdk.builders import timeseries

from serving.config import RollbackConfig
from serving.dashboards.panels import PRIMARY_ROLE, TIER, VARIANT, Query, panel, row

RATE = "[$__rate_interval]"
QUANTILES = (0.5, 0.95, 0.99)

# vLLM's engine metrics carry no variant: every engine serves the same model name. Ray Serve's request
# counter of the engine's replica maps its worker to the deployment (VariantServer:variant-<name>), the join
# Ray's own Serve LLM dashboard makes; `* 0 + 1` keeps the engine's value unchanged. The counter exists from
# the replica's first health check on, so the join holds before any traffic.
ENGINE_VARIANT = (
    " * on (WorkerId) group_left (variant) max by (WorkerId, variant) (label_replace("
    'ray_serve_deployment_request_counter_total{deployment=~".*variant-($variant)"},'
    ' "variant", "$1", "deployment", ".*variant-(.+)") * 0 + 1)'
)


def engine(metric: str) -> str:
    return f"sum by (variant) (sum by (WorkerId) ({metric}){ENGINE_VARIANT})"


def latency(metric: str) -> list[Query]:
    selector = f"{{{PRIMARY_ROLE}, {TIER}, {VARIANT}}}"
    return [
        Query(
            f"histogram_quantile({q}, sum by (le, variant) (rate({metric}_bucket{selector}{RATE})))",
            f"{{{{variant}}}} p{round(q * 100)}",
        )
        for q in QUANTILES
    ]


def requests(outcome: str) -> str:
    """Requests per second by variant and tier whose outcome matches, e.g. '="error"'."""
    selector = f"{{{PRIMARY_ROLE}, outcome{outcome}, {TIER}, {VARIANT}}}"
    return f"sum by (variant, tier) (rate(ray_serving_requests_total{selector}{RATE}))"


def or_zero(expr: str) -> str:
    """`expr`, or 0 for every variant and tier that answered: a counter series is born at its first event,
    so without this a healthy variant would show no data where it has none, not a zero."""
    answered = requests('!="rejected"')
    return f"({expr} or 0 * {answered})"


def tier_answers() -> str:
    """Answers sent to users per second, by tier (rejected requests excluded)."""
    selector = f'{{{PRIMARY_ROLE}, outcome!="rejected", {TIER}}}'
    return f"sum by (tier) (rate(ray_serving_requests_total{selector}{RATE}))"


def escalation_panels() -> list[timeseries.Panel]:
    """Escalation (README, "Escalation"): its rate and the latency it adds. Both fall back to 0 for every tier
    that answered: a tier without an escalation has no series, and a zero is what it shows."""
    escalated = f'sum by (tier) (rate(ray_serving_overrides_total{{kind="escalation", {TIER}}}{RATE}))'
    rerun = f'{{role="escalation", {TIER}}}'
    added = [
        Query(
            f"(histogram_quantile({q}, sum by (le, tier) (rate(ray_serving_request_duration_seconds_bucket{rerun}"
            f"{RATE}))) or 0 * {tier_answers()})",
            f"{{{{tier}}}} p{round(q * 100)}",
        )
        for q in (0.5, 0.95)
    ]
    return [
        panel(
            "Escalation rate by tier",
            "Share of the tier's answers that were re-run on its full-precision baseline because the quantized "
            "answer's mean token log-prob was below the tier's escalation.min_mean_logprob.",
            "percentunit",
            [Query(f"({escalated} or 0 * {tier_answers()}) / {tier_answers()}", "{{tier}}")],
            minimum=0,
        ),
        panel(
            "Latency added by escalation by tier",
            "p50 and p95 duration of the full-precision re-run, which the client waits for after the quantized "
            "answer (0 while nothing is escalated).",
            "s",
            added,
            minimum=0,
        ),
    ]


def build(rollback: RollbackConfig) -> list[dashboard_builders.Row | timeseries.Panel]:
    """The rows and panels, in order; the dashboard's grid follows it."""
    return [
        row("Traffic"),
        panel(
            "Requests by variant and tier",
            "Answers sent to users per second, by the variant that answered and the caller's tier. Shadow calls "
            "are not counted here.",
            "reqps",
            [Query(requests('=~".*"'), "{{variant}} / {{tier}}")],
        ),
        panel(
            "Errors by variant and tier",
            "Requests per second that failed on the engine's side (outcome=error: engine down, stream interrupted). "
            "Requests refused as invalid (outcome=rejected, 400s) are the caller's and shown apart.",
            "reqps",
            [
                Query(or_zero(requests('="error"')), "{{variant}} / {{tier}} error"),
                Query(requests('="rejected"'), "{{variant}} / {{tier}} rejected"),
            ],
        ),
        panel(
            "Error rate by variant and tier",
            "Errors over answered requests (rejected ones excluded, as the rollout's error check does). The red "
            f"line is the rollback threshold max_error_rate ({rollback.max_error_rate}); the controller judges a "
            "candidate by the Wilson lower bound of this rate, so the raw rate may cross the line briefly without a "
            "rollback.",
            "percentunit",
            [Query(or_zero(requests('="error"')) + " / " + requests('!="rejected"'), "{{variant}} / {{tier}}")],
            threshold=rollback.max_error_rate,
            minimum=0,
        ),
        panel(
            "Tokens by variant",
            "Prompt tokens (in) and completion tokens (out) per second, by variant.",
            "suffix: tok/s",
            [
                Query(
                    f"sum by (variant, direction) (rate(ray_serving_tokens_total{{{TIER}, {VARIANT}}}{RATE}))",
                    "{{variant}} {{direction}}",
                )
            ],
        ),
        row("Latency (primary calls, as the router sees them)"),
        panel(
            "End-to-end latency by variant",
            "p50, p95 and p99 of the whole variant call, from the router's request to the last byte. Grows with "
            "the answer's length; the rollout judges TTFT and time per output token instead.",
            "s",
            latency("ray_serving_request_duration_seconds"),
            width=8,
        ),
        panel(
            "Time to first token by variant",
            "p50, p95 and p99 time until the first token of a streamed answer (whole answers record none). "
            f"The rollout trips when the candidate's p{round(rollback.latency_quantile * 100)} is surely over "
            f"{rollback.max_latency_ratio}x the baseline's.",
            "s",
            latency("ray_serving_time_to_first_token_seconds"),
            width=8,
        ),
        panel(
            "Time per output token by variant",
            "p50, p95 and p99 time per output token after the first (whole answers: all of it per token). "
            f"The rollout trips when the candidate's p{round(rollback.latency_quantile * 100)} is surely over "
            f"{rollback.max_latency_ratio}x the baseline's.",
            "s",
            latency("ray_serving_time_per_output_token_seconds"),
            width=8,
        ),
        row("Canary and shadow"),
        panel(
            "Canary weight by tier",
            "The live share of each tier's users sent to its candidate, as the rollout controller holds it. "
            "A drop to 0 is a rollback (see the annotations) or an operator's apply.",
            "percent",
            [
                Query(
                    f"max by (tier, candidate) (ray_serving_canary_weight_percent{{{TIER}}})",
                    "{{tier}}: {{candidate}}",
                )
            ],
            minimum=0,
        ),
        panel(
            "Shadow requests dropped by tier",
            "Shadow comparisons dropped per second instead of queued: saturated (the router's shadow concurrency "
            "limit was reached) or failed (the shadow call or its scoring failed). Dropped shadows leave the quality "
            "checks with fewer samples.",
            "reqps",
            [
                Query(
                    f"sum by (tier, reason) (rate(ray_serving_shadow_dropped_total{{{TIER}}}{RATE}))",
                    "{{tier}} {{reason}}",
                )
            ],
            minimum=0,
        ),
        row("Escalation to full precision"),
        *escalation_panels(),
        row("Engines (vLLM's own metrics, exported by Ray)"),
        panel(
            "Engine requests running and waiting",
            "Requests each engine is running and holding in its queue (vLLM's scheduler), by the variant the "
            "engine serves. A growing queue means the engine is the bottleneck, not the router.",
            "short",
            [
                Query(engine("ray_vllm_num_requests_running"), "{{variant}} running"),
                Query(engine("ray_vllm_num_requests_waiting"), "{{variant}} waiting"),
            ],
            minimum=0,
        ),
        panel(
            "Engine KV cache use",
            "Share of each engine's KV cache blocks in use. Near 100 %, the engine preempts or queues requests.",
            "percentunit",
            [Query(engine("ray_vllm_kv_cache_usage_perc"), "{{variant}}")],
            minimum=0,
        ),
    ]
