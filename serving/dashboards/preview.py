"""A preview of a dashboard without Grafana: every panel's queries run against a Prometheus over a time
range (query_range), drawn with matplotlib where the dashboard's grid puts the panel, with its threshold
lines and the dashboard's annotations (rollbacks, promotions) as vertical lines.

The report says, per panel, how many series came back and any query error: the every-panel test reads it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from matplotlib.axes import Axes
from matplotlib.dates import DateFormatter, date2num
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from serving.dashboards.panels import expand

GRID_COLUMNS = 24
INCHES_PER_ROW = 0.42  # one Grafana grid row is 30 px; panels stay readable at this scale
POINTS = 240  # samples per series across the range, about what a Grafana panel asks for


class QueryError(Exception):
    """Prometheus refused a query or could not be reached."""


@dataclass(frozen=True)
class Series:
    labels: dict[str, str]
    points: list[tuple[float, float]]  # (unix time, value)


# (expr, start, end, step) -> series: the one seam the tests replace.
Fetch = Callable[[str, float, float, float], list[Series]]


def prometheus(url: str, timeout_s: float = 30.0) -> Fetch:
    def fetch(expr: str, start: float, end: float, step: float) -> list[Series]:
        try:
            reply = httpx.get(
                f"{url.rstrip('/')}/api/v1/query_range",
                params={"query": expr, "start": start, "end": end, "step": step},
                timeout=timeout_s,
            )
            answer = reply.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise QueryError(f"cannot query {url}: {exc}") from exc
        if answer.get("status") != "success":
            raise QueryError(f"{answer.get('errorType', reply.status_code)}: {answer.get('error', reply.text)}")
        return [
            Series(item["metric"], [(float(t), float(v)) for t, v in item["values"]])
            for item in answer["data"]["result"]
        ]

    return fetch


@dataclass
class PanelResult:
    title: str
    series: int = 0
    errors: list[str] = field(default_factory=list)
    empty_queries: list[str] = field(default_factory=list)  # refIds whose query returned no series


@dataclass
class Report:
    dashboard: str
    panels: list[PanelResult] = field(default_factory=list)
    annotations: dict[str, int] = field(default_factory=dict)  # name -> events found

    @property
    def ok(self) -> bool:
        """No query failed (empty panels are allowed: the every-panel test asks for more)."""
        return not any(p.errors for p in self.panels)

    @property
    def empty(self) -> list[str]:
        return [p.title for p in self.panels if not p.errors and p.series == 0]

    @property
    def empty_queries(self) -> list[str]:
        """Every query that returned nothing, as "panel title (refId)": a panel may draw lines and still
        have a query (say, its noise floor) that never found data."""
        return [f"{p.title} ({ref})" for p in self.panels for ref in p.empty_queries]

    def lines(self) -> list[str]:
        found = [f"{self.dashboard}: {len(self.panels)} panels"]
        for p in self.panels:
            state = "; ".join(p.errors) if p.errors else f"{p.series} series" if p.series else "no data"
            if p.series and p.empty_queries:
                state += f" (no data from {', '.join(p.empty_queries)})"
            found.append(f"  {p.title}: {state}")
        found += [f"  annotation {name}: {count} events" for name, count in self.annotations.items()]
        return found


def event_starts(series: Series, step: float) -> list[float]:
    """Where an annotation's runs of non-zero points begin: Grafana shows a run as one event."""
    starts, last = [], None
    for t, v in series.points:
        if v and (last is None or t - last > 1.5 * step):
            starts.append(t)
        if v:
            last = t
    return starts


def legend(template: str, labels: dict[str, str]) -> str:
    """Grafana's legendFormat: {{label}} placeholders."""
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template) or str(labels)


def unit_formatter(unit: str) -> FuncFormatter:
    if unit == "percentunit":
        return FuncFormatter(lambda v, _: f"{v * 100:.3g}%")
    if unit == "percent":
        return FuncFormatter(lambda v, _: f"{v:.3g}%")
    suffix = {"s": " s", "reqps": "/s"}.get(unit, unit.removeprefix("suffix:") if unit.startswith("suffix:") else "")
    return FuncFormatter(lambda v, _: f"{v:.3g}{suffix}")


def when(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


def x(t: float) -> float:
    """matplotlib's date axis position of a unix time."""
    return float(date2num(when(t)))  # type: ignore[no-untyped-call]


def draw_panel(
    axes: Axes, panel: dict[str, Any], found: list[tuple[str, Series]], result: PanelResult, seconds: bool = False
) -> None:
    defaults = panel.get("fieldConfig", {}).get("defaults", {})
    axes.set_title(str(panel.get("title", "")), fontsize=8, loc="left")
    axes.tick_params(labelsize=6)
    axes.xaxis.set_major_formatter(DateFormatter("%H:%M:%S" if seconds else "%H:%M"))  # type: ignore[no-untyped-call]
    axes.yaxis.set_major_formatter(unit_formatter(str(defaults.get("unit", ""))))
    for name, series in found:
        axes.plot([x(t) for t, _ in series.points], [v for _, v in series.points], label=name, linewidth=1)
    for step in defaults.get("thresholds", {}).get("steps", []):
        if step.get("value") is not None:
            axes.axhline(step["value"], color=step.get("color", "red"), linestyle="--", linewidth=0.8)
    if result.errors:
        axes.text(0.5, 0.5, "query error", transform=axes.transAxes, ha="center", color="red", fontsize=8)
    elif not found:
        axes.text(0.5, 0.5, "no data", transform=axes.transAxes, ha="center", color="grey", fontsize=8)
    else:
        axes.legend(fontsize=5, loc="upper left", ncol=2, frameon=False)


def render(data: dict[str, Any], fetch: Fetch, start: float, end: float, out: Path) -> Report:
    step = max((end - start) / POINTS, 1.0)
    rate_interval = f"{max(round(4 * step), 60)}s"  # as Grafana: at least four samples per rate window
    panels = data.get("panels", [])
    # One spare grid row on top holds the dashboard's title.
    height = max((p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels), default=1) + 1
    figure = Figure(figsize=(16, max(height * INCHES_PER_ROW, 3)))
    figure.suptitle(
        f"{data.get('title', '')}   {when(start):%Y-%m-%d %H:%M} to {when(end):%H:%M} UTC",
        fontsize=10,
        y=1 - 0.3 / height,
    )
    report = Report(str(data.get("title", "")))
    events: list[tuple[float, str]] = []
    for annotation in data.get("annotations", {}).get("list", []):
        try:
            marked = fetch(expand(annotation["expr"], rate_interval), start, end, step)
        except QueryError as exc:
            report.annotations[annotation["name"]] = 0
            report.panels.append(PanelResult(f"annotation {annotation['name']}", errors=[str(exc)]))
            continue
        times = [t for series in marked for t in event_starts(series, step)]
        report.annotations[annotation["name"]] = len(times)
        events += [(t, annotation.get("iconColor", "red")) for t in times]
    for panel in panels:
        g = panel["gridPos"]
        left, top = g["x"] / GRID_COLUMNS, 1 - (g["y"] + 1) / height
        if panel.get("type") == "row":
            figure.text(left + 0.005, top - 0.5 / height, str(panel.get("title", "")), fontsize=9, weight="bold")
            continue
        result = PanelResult(str(panel.get("title", "")))
        found: list[tuple[str, Series]] = []
        for target in panel.get("targets", []):
            try:
                series = fetch(expand(target["expr"], rate_interval), start, end, step)
            except QueryError as exc:
                result.errors.append(f"{target.get('refId', '?')}: {exc}")
                continue
            if not series:
                result.empty_queries.append(str(target.get("refId", "?")))
            found += [(legend(target.get("legendFormat", ""), s.labels), s) for s in series]
        result.series = len(found)
        report.panels.append(result)
        # Margins inside the panel's cell leave room for its title and tick labels.
        width, tall = g["w"] / GRID_COLUMNS, g["h"] / height
        axes = figure.add_axes((left + 0.03 * width + 0.01, top - tall + 0.25 * tall, width * 0.9, tall * 0.6))
        draw_panel(axes, panel, found, result, seconds=end - start < 600)  # short ranges tick in seconds
        for t, color in events:
            axes.axvline(x(t), color=color, linewidth=0.6, alpha=0.6)
        axes.set_xlim(x(start), x(end))
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    return report


def render_file(dashboard: Path, url: str, start: float, end: float, out: Path) -> Report:
    import json

    return render(json.loads(dashboard.read_text()), prometheus(url), start, end, out)
