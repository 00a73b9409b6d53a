"""The metrics contract on both backends: Ray's export (what the deployment uses) accepts every declaration,
and the in-memory one holds the names Prometheus scrapes from Ray's metrics agent."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from serving.metrics import EXPORTED_PREFIX, ActorExport, ControllerMetrics, InMemory, Metrics, RayExport, sample


class Recorded:
    """A stand-in for one Ray metric: what a family hands to Ray."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float, dict[str, str] | None]] = []
        self.info = {"name": "x"}

    def inc(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.calls.append(("inc", value, tags))

    def _record(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.calls.append(("record", value, tags))

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.calls.append(("set", value, tags))


class Declared:
    """A backend that only lists the declarations."""

    def __init__(self) -> None:
        self.names: dict[str, tuple[str, tuple[str, ...]]] = {}

    def counter(self, name: str, description: str, labels: Sequence[str]) -> Any:
        self.names[name] = ("counter", tuple(labels))

    def gauge(self, name: str, description: str, labels: Sequence[str] = ()) -> Any:
        self.names[name] = ("gauge", tuple(labels))

    def histogram(self, name: str, description: str, labels: Sequence[str], buckets: Sequence[float]) -> Any:
        assert all(b > 0 for b in buckets), f"{name}: Ray refuses boundaries <= 0"
        self.names[name] = ("histogram", tuple(labels))


def test_ray_accepts_every_declaration_and_sample_outside_a_replica() -> None:
    metrics = Metrics(RayExport())  # Ray refuses a bad name, boundary or reserved tag here, at declaration
    metrics.requests.labels("fp16", "premium", "primary", "ok").inc()
    metrics.shadow_dropped.labels("batch", "failed").inc(0)
    metrics.token_agreement.labels("batch", "awq", "fp16", "candidate").observe(0.0)
    controller = ControllerMetrics(ActorExport())  # a plain actor's: ray.util.metrics
    controller.rollout_fail_safe.set(0)
    controller.rollbacks.labels("batch", "score_drift").inc(0)


def test_the_contract_names_labels_and_kinds() -> None:
    declared = Declared()
    Metrics(declared)
    ControllerMetrics(declared)
    for name, (kind, labels) in declared.names.items():
        assert name.startswith("serving_"), name
        assert ":" not in name, name
        assert name.endswith("_total") == (kind == "counter"), name
        # Serve adds these itself; declaring them is an error in Ray.
        assert not {"deployment", "replica", "application"} & set(labels), name


def test_in_memory_names_are_the_scraped_names() -> None:
    metrics = Metrics(InMemory())
    metrics.requests.labels("fp16", "premium", "primary", "ok").inc()
    assert sample(metrics, EXPORTED_PREFIX + "serving_requests_total", {"variant": "fp16", "tier": "premium",
                  "role": "primary", "outcome": "ok"}) == 1  # fmt: skip
    assert sample(metrics, "serving_requests_total", {"variant": "fp16"}) is None


def test_a_ray_family_passes_labels_as_tags_and_records_a_zero() -> None:
    from serving.metrics import _RayFamily

    metric = Recorded()
    family = _RayFamily(metric, ("tier", "reason"))
    family.labels("batch", "busy").inc(0)  # Ray's own inc refuses 0; a zero series is still data
    family.labels("batch", "busy").inc(2)
    assert metric.calls == [
        ("record", 0.0, {"tier": "batch", "reason": "busy"}),
        ("inc", 2, {"tier": "batch", "reason": "busy"}),
    ]
    assert family.labels("batch", "busy") is family.labels("batch", "busy")  # one tag dict per series


def test_the_real_prometheus_test_asserts_every_declared_metric() -> None:
    # tests/integration/test_prometheus.py checks its CONTRACT list on a real scrape; a metric declared here and
    # missing there would go unchecked. The rollout's rollbacks and phase are asserted by the rollout tests.
    from serving.metrics import ControllerMetrics
    from tests.integration.test_prometheus import CONTRACT

    declared = Declared()
    Metrics(declared)
    ControllerMetrics(declared)
    scraped = {
        EXPORTED_PREFIX + name + ("_bucket" if kind == "histogram" else "")
        for name, (kind, _) in declared.names.items()
        if name not in {"serving_rollbacks_total", "serving_rollout_phase"}
    }
    assert scraped - set(CONTRACT) == set()
    assert len(scraped) >= 15
