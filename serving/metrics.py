"""Every metric of the router, declared once. One prefix (`serving_`, exported as `ray_serving_`), base
units, `_total` only on counters, small fixed label sets. Ratios are computed in PromQL, not exported;
each declaration carries the query that reads it.

Where the samples go is a backend, passed in:

- `RayExport` (the deployment): Ray Serve's own metrics (`ray.serve.metrics`). Each replica hands its
  samples to its node's metrics agent, which serves every replica and engine on the node at one port
  (`_metrics_export_port`; `serving serve` fixes it to `observability.metrics_port` for a Ray it starts)
  and is found by Prometheus through `prom_metrics_service_discovery.json` in Ray's session folder (or
  KubeRay's PodMonitor). So no replica opens a port: any number of router replicas on a node report,
  which a port per replica (the earlier `prometheus_client.start_http_server`) could not. The cost,
  read from ray 2.60's source and checked on a live agent: Ray prefixes every name with `ray_`
  (`serving_requests_total` is scraped as `ray_serving_requests_total`), adds the labels `deployment`,
  `replica` and `application` (and Ray's own `NodeAddress`, `WorkerId`, ...), so every query
  aggregates across replicas (`sum by`; `max by` for the controller's gauges, where a restarted
  controller's last sample may linger), and exports every `metrics_report_interval_ms` (10 s by
  default; 1 s for a Ray that `serving serve` starts). The metrics must be created in the replica's
  constructor, where Serve's replica context exists, or its labels are missing.
- `InMemory` (unit tests, benchmarks of the router alone): a prometheus_client registry holding the
  same names as Prometheus scrapes them (`ray_` prefix included, Serve's labels not), read with
  `sample(metrics, name, labels)`.

Ray histograms take only boundaries above 0, so RATIO_BUCKETS has no 0 bucket (a ratio of exactly 0
falls in `le="0.1"`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from prometheus_client import CollectorRegistry
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge as PromGauge
from prometheus_client import Histogram as PromHistogram

# Ray's metrics agent prefixes every application metric with this.
EXPORTED_PREFIX = "ray_"

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
RATIO_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
DRIFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


class CounterSeries(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class GaugeSeries(Protocol):
    def set(self, value: float) -> None: ...


class HistogramSeries(Protocol):
    def observe(self, amount: float) -> None: ...


class CounterFamily(Protocol):
    def labels(self, *values: str) -> CounterSeries: ...


class GaugeFamily(GaugeSeries, Protocol):  # a gauge without labels is set directly
    def labels(self, *values: str) -> GaugeSeries: ...


class HistogramFamily(Protocol):
    def labels(self, *values: str) -> HistogramSeries: ...


class Backend(Protocol):
    def counter(self, name: str, description: str, labels: Sequence[str]) -> CounterFamily: ...

    def gauge(self, name: str, description: str, labels: Sequence[str] = ()) -> GaugeFamily: ...

    def histogram(
        self, name: str, description: str, labels: Sequence[str], buckets: Sequence[float]
    ) -> HistogramFamily: ...


class InMemory:
    """A prometheus_client registry under the names Prometheus scrapes from Ray's agent."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()

    def counter(self, name: str, description: str, labels: Sequence[str]) -> CounterFamily:
        return PromCounter(EXPORTED_PREFIX + name, description, labels, registry=self.registry)

    def gauge(self, name: str, description: str, labels: Sequence[str] = ()) -> GaugeFamily:
        return PromGauge(EXPORTED_PREFIX + name, description, labels, registry=self.registry)

    def histogram(
        self, name: str, description: str, labels: Sequence[str], buckets: Sequence[float]
    ) -> HistogramFamily:
        return PromHistogram(EXPORTED_PREFIX + name, description, labels, buckets=buckets, registry=self.registry)


class _RaySeries:
    """One label set of a Ray metric; Ray takes the labels as a dict on every call."""

    def __init__(self, metric: Any, tags: dict[str, str]) -> None:
        self.metric = metric
        self.tags = tags

    def inc(self, amount: float = 1) -> None:
        if amount > 0:
            self.metric.inc(amount, tags=self.tags)
        elif amount == 0:
            # Ray's inc refuses 0, but a zero is data where an absent series is not (a panel reads 0 drops,
            # not "no data"); record it below the check, as Ray's inc would record a positive amount.
            self.metric._record(0.0, tags=self.tags)

    def set(self, value: float) -> None:
        self.metric.set(value, tags=self.tags)

    def observe(self, amount: float) -> None:
        self.metric.observe(amount, tags=self.tags)


class _RayFamily:
    def __init__(self, metric: Any, labels: Sequence[str]) -> None:
        self.metric = metric
        self.label_names = tuple(labels)
        self.series: dict[tuple[str, ...], _RaySeries] = {}

    def labels(self, *values: str) -> _RaySeries:
        found = self.series.get(values)
        if found is None:
            if len(values) != len(self.label_names):
                raise ValueError(f"{self.metric.info['name']} takes labels {self.label_names}, got {values}")
            found = self.series[values] = _RaySeries(self.metric, dict(zip(self.label_names, values, strict=True)))
        return found

    def set(self, value: float) -> None:
        self.metric.set(value)


class RayExport:
    """Ray Serve's metrics: the node's metrics agent exports them. Create inside a replica's constructor."""

    def counter(self, name: str, description: str, labels: Sequence[str]) -> CounterFamily:
        from ray.serve import metrics

        return _RayFamily(metrics.Counter(name, description, tag_keys=tuple(labels)), labels)

    def gauge(self, name: str, description: str, labels: Sequence[str] = ()) -> GaugeFamily:
        from ray.serve import metrics

        return _RayFamily(metrics.Gauge(name, description, tag_keys=tuple(labels)), labels)

    def histogram(
        self, name: str, description: str, labels: Sequence[str], buckets: Sequence[float]
    ) -> HistogramFamily:
        from ray.serve import metrics

        return _RayFamily(
            metrics.Histogram(name, description, boundaries=list(buckets), tag_keys=tuple(labels)), labels
        )


def sample(metrics: Metrics | ControllerMetrics, name: str, labels: Mapping[str, str] | None = None) -> float | None:
    """A sample's value from in-memory metrics (tests), by its scraped name, e.g. `ray_serving_requests_total`."""
    if not isinstance(metrics.backend, InMemory):
        raise TypeError("only in-memory metrics can be read here; Ray's are read from the node's metrics agent")
    return metrics.backend.registry.get_sample_value(name, dict(labels or {}))


class Metrics:
    def __init__(self, backend: Backend | None = None) -> None:
        if backend is None:
            backend = InMemory()
        self.backend = backend
        # histogram_quantile(0.99,
        #   sum by (le, variant) (rate(ray_serving_request_duration_seconds_bucket{role="primary"}[5m])))
        # role: primary (the answer routing chose), shadow, or escalation (the full-precision re-run of a
        # low-confidence answer: its duration is the latency escalation adds)
        self.request_duration = backend.histogram(
            "serving_request_duration_seconds",
            "End-to-end latency of a variant call, as the router sees it",
            ("variant", "tier", "role"),
            LATENCY_BUCKETS,
        )
        # histogram_quantile(0.99, sum by (le, variant) (rate(ray_serving_time_to_first_token_seconds_bucket[5m])))
        self.time_to_first_token = backend.histogram(
            "serving_time_to_first_token_seconds",
            "Time until the first token of a streamed answer (not recorded for whole answers)",
            ("variant", "tier", "role"),
            LATENCY_BUCKETS,
        )
        # histogram_quantile(0.5, sum by (le, variant) (rate(ray_serving_time_per_output_token_seconds_bucket[5m])))
        self.time_per_output_token = backend.histogram(
            "serving_time_per_output_token_seconds",
            "Time per output token after the first of a streamed answer, from the engine's token counts (not chunks)",
            ("variant", "tier", "role"),
            PER_TOKEN_BUCKETS,
        )
        # sum by (variant) (rate(ray_serving_requests_total{outcome!="ok"}[5m]))
        #   / sum by (variant) (rate(ray_serving_requests_total[5m]))
        self.requests = backend.counter(
            "serving_requests_total",
            "Requests by the variant that served them and outcome",
            ("variant", "tier", "role", "outcome"),
        )
        # sum by (variant, direction) (rate(ray_serving_tokens_total[5m]))
        self.tokens = backend.counter(
            "serving_tokens_total",
            "Prompt (in) and completion (out) tokens",
            ("variant", "tier", "direction"),
        )
        # rate(ray_serving_shadow_disagreements_total[5m]) / rate(ray_serving_shadow_comparisons_total[5m])
        self.shadow_comparisons = backend.counter(
            "serving_shadow_comparisons_total",
            "Compared primary/shadow pairs; kind=noise_floor pairs a variant with itself",
            ("tier", "primary", "shadow", "kind"),
        )
        self.shadow_disagreements = backend.counter(
            "serving_shadow_disagreements_total",
            "Pairs whose normalized outputs differ",
            ("tier", "primary", "shadow", "kind"),
        )
        # sum(rate(ray_serving_token_agreement_ratio_sum[5m])) / sum(rate(ray_serving_token_agreement_ratio_count[5m]))
        self.token_agreement = backend.histogram(
            "serving_token_agreement_ratio",
            "Share of output token positions where primary and shadow agree",
            ("tier", "primary", "shadow", "kind"),
            RATIO_BUCKETS,
        )
        # rate(ray_serving_score_drift_sum[5m]) / rate(ray_serving_score_drift_count[5m])
        self.score_drift = backend.histogram(
            "serving_score_drift",
            "Mean |delta log-prob| per token of the primary's output, teacher-forced",
            ("tier", "primary", "shadow", "kind"),
            DRIFT_BUCKETS,
        )
        # sum by (variant, kind) (rate(ray_serving_overrides_total[5m]))
        # escalation rate: sum by (tier) (rate(ray_serving_overrides_total{kind="escalation"}[5m]))
        #   / sum by (tier) (rate(ray_serving_requests_total{role="primary", outcome!="rejected"}[5m]))
        # a down candidate: sum by (tier, variant) (rate(ray_serving_overrides_total{kind="fallback"}[5m])) > 0
        self.overrides = backend.counter(
            "serving_overrides_total",
            "Routing pins (kind=routing), people overturning answers (kind=feedback), answers re-run on full "
            "precision (kind=escalation), a down candidate's requests answered by its baseline (kind=fallback, "
            "variant=the candidate)",
            ("variant", "tier", "kind"),
        )
        # sum by (variant, tier) (rate(ray_serving_feedback_total[5m]))
        self.feedback = backend.counter(
            "serving_feedback_total",
            "Feedback received on answers, overturned or not",
            ("variant", "tier"),
        )
        # sum by (tier, reason) (rate(ray_serving_shadow_dropped_total[5m]))
        self.shadow_dropped = backend.counter(
            "serving_shadow_dropped_total",
            "Shadow requests dropped instead of queued",
            ("tier", "reason"),
        )


class ActorExport(RayExport):
    """Metrics of a plain Ray actor (the rollout controller): `ray.util.metrics`, exported by the node's
    metrics agent like Serve's, without the replica tags that only a Serve replica has."""

    def counter(self, name: str, description: str, labels: Sequence[str]) -> CounterFamily:
        from ray.util import metrics

        return _RayFamily(metrics.Counter(name, description, tag_keys=tuple(labels)), labels)

    def gauge(self, name: str, description: str, labels: Sequence[str] = ()) -> GaugeFamily:
        from ray.util import metrics

        return _RayFamily(metrics.Gauge(name, description, tag_keys=tuple(labels)), labels)


class ControllerMetrics:
    """The rollout controller's own metrics, in one recorder, emitted once by the controller (never
    mirrored by the router replicas, which would count each rollback once per replica and again after
    a router restart). A restarted controller starts its counters at 0, which increase() reads as a reset."""

    def __init__(self, backend: Backend | None = None) -> None:
        backend = backend or InMemory()
        self.backend = backend
        # sum by (tier, reason) (increase(ray_serving_rollbacks_total[1h]))
        self.rollbacks = backend.counter(
            "serving_rollbacks_total",
            "Automatic rollbacks of a tier's candidate, by the check that tripped",
            ("tier", "reason"),
        )
        # sum by (tier) (increase(ray_serving_promotions_total[1h]))
        self.promotions = backend.counter(
            "serving_promotions_total",
            "Candidates promoted to all traffic (weight 100), by config or by progression",
            ("tier",),
        )
        # max by (tier, phase) (ray_serving_rollout_phase) == 1   (max: an old controller's last sample may linger)
        self.rollout_phase = backend.gauge(
            "serving_rollout_phase",
            "1 for the tier's current rollout phase, 0 for the others",
            ("tier", "phase"),
        )
        # max by (tier, candidate) (ray_serving_canary_weight_percent)   (max: as for the phase)
        self.canary_weight = backend.gauge(
            "serving_canary_weight_percent",
            "Live canary weight of the tier's candidate: what the routers are told (0 while rolled back or held)",
            ("tier", "candidate"),
        )
        # max(ray_serving_rollout_fail_safe) == 1   (page: canaries are held at 0 until an operator applies a config)
        self.rollout_fail_safe = backend.gauge(
            "serving_rollout_fail_safe",
            "1 while the rollout controller holds every candidate at 0 after a damaged state file",
        )
        # time() - max(ray_serving_rollout_last_evaluation_timestamp_seconds) > 3 * interval_s + export delay
        self.last_evaluation = backend.gauge(
            "serving_rollout_last_evaluation_timestamp_seconds",
            "Unix time of the rollout controller's last judgement of the candidates (with rollback off: of its "
            "last pass, which had nothing to judge)",
        )
