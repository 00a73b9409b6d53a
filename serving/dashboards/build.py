"""Assembles the dashboards and writes or checks their JSON under deploy/grafana/."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import yaml
from grafana_foundation_sdk.builders import dashboard as dashboard_builders
from grafana_foundation_sdk.builders import timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard

from serving.config import RollbackConfig
from serving.dashboards import overview, quality
from serving.dashboards.panels import PROMOTIONS, ROLLBACKS, variables

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "deploy" / "demo.yaml"  # the thresholds drawn beside the quality signals
OUT = ROOT / "deploy" / "grafana"

Layout = Callable[[RollbackConfig], list[dashboard_builders.Row | timeseries.Panel]]
DASHBOARDS: dict[str, tuple[str, str, Layout]] = {
    "overview": ("precision-serving: overview", "Traffic, errors, latency, canary weights, engines", overview.build),
    "quality": ("precision-serving: quality", "Shadow comparisons and feedback beside their thresholds", quality.build),
}


def rollback_config(path: Path = CONFIG) -> RollbackConfig:
    """The config's rollback section alone: the variants' model folders need not exist to draw thresholds."""
    return RollbackConfig.model_validate(yaml.safe_load(path.read_text()).get("rollback", {}))


def render(name: str, rollback: RollbackConfig) -> dict[str, object]:
    title, description, layout = DASHBOARDS[name]
    board = (
        dashboard_builders.Dashboard(title)
        .uid(f"precision-serving-{name}")
        .description(description)
        .tags(["precision-serving"])
        .time("now-1h", "now")
        .refresh("30s")
        .tooltip(dashboard.DashboardCursorSync.CROSSHAIR)
        .variables(list(variables()))
        .annotations([ROLLBACKS.builder(), PROMOTIONS.builder()])
    )
    for item in layout(rollback):
        board = board.with_row(item) if isinstance(item, dashboard_builders.Row) else board.with_panel(item)
    data: dict[str, object] = json.loads(json.dumps(board.build(), cls=JSONEncoder))
    annotations = data["annotations"]
    assert isinstance(annotations, dict)
    for entry, found in zip(annotations["list"], (ROLLBACKS, PROMOTIONS), strict=True):
        entry.update(found.extra_fields())
    for number, entry in enumerate(panels_of(data), start=1):
        entry["id"] = number  # stable ids: Grafana links and the preview refer to panels by them
    return data


def panels_of(data: dict[str, object]) -> list[dict[str, object]]:
    found = data.get("panels", [])
    assert isinstance(found, list)
    return found


def text_of(data: dict[str, object]) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def write(out: Path = OUT, rollback: RollbackConfig | None = None) -> list[Path]:
    rollback = rollback or rollback_config()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in DASHBOARDS:
        path = out / f"{name}.json"
        path.write_text(text_of(render(name, rollback)))
        written.append(path)
    return written


def stale(out: Path = OUT, rollback: RollbackConfig | None = None) -> list[Path]:
    """The committed files that differ from what the generator makes now (missing ones included)."""
    rollback = rollback or rollback_config()
    found = []
    for name in DASHBOARDS:
        path = out / f"{name}.json"
        if not path.exists() or path.read_text() != text_of(render(name, rollback)):
            found.append(path)
    return found
