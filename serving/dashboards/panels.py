"""The few building blocks every panel of the shipped dashboards is made of, over grafana-foundation-sdk.

Each panel is a time series with a description, a unit and, for a quality signal, the rollback threshold
drawn as a line (red) with an early-warning line at 80 % of it (orange), the level the alerts warn at.
"""

from __future__ import annotations

from dataclasses import dataclass

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as dashboard_builders
from grafana_foundation_sdk.builders import prometheus, timeseries
from grafana_foundation_sdk.models import common, dashboard

DATASOURCE = dashboard.DataSourceRef(type_val="prometheus", uid="${datasource}")
WARNING_SHARE = 0.8  # alerts warn at this share of a rollback threshold (deploy/prometheus/alerts.yml)

# Selectors the tier and variant template variables narrow (multi-valued: Grafana writes a regex).
TIER = 'tier=~"$tier"'
VARIANT = 'variant=~"$variant"'
PRIMARY = 'primary=~"$variant"'
PRIMARY_ROLE = 'role="primary"'  # the answers users got; shadow calls carry role="shadow"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


def panel(
    title: str,
    description: str,
    unit: str,
    queries: list[Query],
    *,
    width: int = 12,
    height: int = 8,
    threshold: float | None = None,
    above_is_bad: bool = True,
    minimum: float | None = None,
) -> timeseries.Panel:
    """A time series panel. `threshold` draws a rollback threshold as a line; when above it is bad, an
    early-warning line at WARNING_SHARE of it too (when below is bad, e.g. too few samples, just the line)."""
    built = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .unit(unit)
        .datasource(DATASOURCE)
        .span(width)
        .height(height)
        .legend(
            common_builders.VizLegendOptions()
            .show_legend(True)
            .display_mode(common.LegendDisplayMode.LIST)
            .placement(common.LegendPlacement.BOTTOM)
        )
    )
    for ref, query in zip("ABCDEFGH", queries, strict=False):
        built = built.with_target(
            prometheus.Dataquery().expr(query.expr).legend_format(query.legend).ref_id(ref).range()
        )
    if minimum is not None:
        built = built.min(minimum)
    if threshold is not None:
        built = built.thresholds(
            dashboard_builders.ThresholdsConfig()
            .mode(dashboard.ThresholdsMode.ABSOLUTE)
            .steps(threshold_steps(threshold, above_is_bad))
        ).thresholds_style(common_builders.GraphThresholdsStyleConfig().mode(common.GraphTresholdsStyleMode.LINE))
    return built


def threshold_steps(threshold: float, above_is_bad: bool) -> list[dashboard.Threshold]:
    if not above_is_bad:
        return [dashboard.Threshold(value=None, color="red"), dashboard.Threshold(value=threshold, color="green")]
    return [
        dashboard.Threshold(value=None, color="green"),
        dashboard.Threshold(value=round(WARNING_SHARE * threshold, 6), color="orange"),
        dashboard.Threshold(value=threshold, color="red"),
    ]


def row(title: str) -> dashboard_builders.Row:
    return dashboard_builders.Row(title)


def variables() -> list[dashboard_builders.DatasourceVariable | dashboard_builders.QueryVariable]:
    """datasource, tier and variant; tier and variant are multi-valued with an All that matches anything."""
    found: list[dashboard_builders.DatasourceVariable | dashboard_builders.QueryVariable] = [
        dashboard_builders.DatasourceVariable("datasource").label("Prometheus").type("prometheus")
    ]
    # Tiers come from the canary weight, which the rollout controller sets when it starts: the list fills before
    # traffic.
    sources = (
        ("tier", "Tier", "ray_serving_canary_weight_percent"),
        ("variant", "Variant", "ray_serving_requests_total"),
    )
    for name, label, metric in sources:
        found.append(
            dashboard_builders.QueryVariable(name)
            .label(label)
            .description(f"the {name} label of the router's metrics")
            .datasource(DATASOURCE)
            .query(f"label_values({metric}, {name})")
            .refresh(dashboard.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(dashboard.VariableSort.ALPHABETICAL_ASC)
            .multi(True)
            .include_all(True)
            .all_value(".*")
        )
    return found


@dataclass(frozen=True)
class Annotation:
    name: str
    expr: str
    title: str  # Grafana's titleFormat: {{label}} placeholders
    color: str

    def builder(self) -> dashboard_builders.AnnotationQuery:
        return (
            dashboard_builders.AnnotationQuery()
            .name(self.name)
            .datasource(DATASOURCE)
            .enable(True)
            .icon_color(self.color)
            .expr(self.expr)
        )

    def extra_fields(self) -> dict[str, object]:
        """What Grafana's Prometheus annotations read and the SDK's (Grafana 10.1) model has no field for."""
        return {"titleFormat": self.title, "tagKeys": "tier", "step": "30s", "useValueForTime": False}


# Rollbacks and promotions, as events on every time series. The rollout controller emits its counts and
# phases once; max (never sum) also covers a restarted controller whose old series linger a while. Its
# counters start at 0, but a series that exists now and did not a minute ago is still read as an event
# (a controller from before that change created its series at 1, which increase() cannot see).
ROLLBACKS = Annotation(
    name="Rollbacks",
    expr=(
        "(max by (tier, reason) (ray_serving_rollbacks_total)"
        " unless max by (tier, reason) (ray_serving_rollbacks_total offset 1m))"
        " or (max by (tier, reason) (increase(ray_serving_rollbacks_total[1m])) > 0)"
    ),
    title="{{tier}} rolled back: {{reason}}",
    color="red",
)
PROMOTIONS = Annotation(
    name="Promotions",
    expr=(
        'max by (tier) (ray_serving_rollout_phase{phase="promoted"}) == 1'
        ' unless max by (tier) (ray_serving_rollout_phase{phase="promoted"} offset 1m) == 1'
    ),
    title="{{tier}} promoted",
    color="green",
)


def expand(expr: str, rate_interval: str = "1m") -> str:
    """A panel's query as Grafana sends it with every tier and variant selected: plain PromQL."""
    return expr.replace("$__rate_interval", rate_interval).replace("$tier", ".*").replace("$variant", ".*")
