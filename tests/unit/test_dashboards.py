"""The dashboards under deploy/grafana/: what the generator makes, panel by panel, and queries that parse and
read only metrics that exist."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

from serving.config import RollbackConfig
from serving.dashboards import build
from serving.dashboards.panels import WARNING_SHARE, expand
from serving.metrics import ControllerMetrics, InMemory, Metrics

RAY_LLM_PANELS = Path(ray.__file__).parent / "dashboard/modules/metrics/dashboards/serve_llm_dashboard_panels.py"
SAMPLE_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def dashboards() -> dict[str, dict[str, object]]:
    return {name: json.loads((build.OUT / f"{name}.json").read_text()) for name in build.DASHBOARDS}


def graph_panels(data: dict[str, object]) -> list[dict[str, object]]:
    return [p for p in build.panels_of(data) if p["type"] != "row"]


def expressions(data: dict[str, object]) -> list[str]:
    found = [str(t["expr"]) for p in graph_panels(data) for t in p["targets"]]  # type: ignore[attr-defined]
    annotations = data["annotations"]
    assert isinstance(annotations, dict)
    return found + [str(a["expr"]) for a in annotations["list"]]


def contract_names() -> set[str]:
    """Every sample name serving/metrics.py can export."""
    names = set()
    exported = InMemory()  # the names as Prometheus scrapes them from Ray's metrics agent
    Metrics(exported)
    ControllerMetrics(exported)
    for family in exported.registry.collect():
        names |= {family.name + suffix for suffix in SAMPLE_SUFFIXES[family.type]}
    return names


def ray_names() -> set[str]:
    """The ray_* metric names that Ray's own Serve LLM dashboard reads: what Ray exports for vLLM engines."""
    return set(re.findall(r"\b(ray_[a-z_]+)", RAY_LLM_PANELS.read_text()))


def metric_names(expr: str) -> set[str]:
    unquoted = re.sub(r'"[^"]*"', '""', expr)
    return set(re.findall(r"\b((?:serving|ray)_[a-zA-Z0-9_]+)\b", unquoted))


def test_the_committed_json_is_what_the_generator_makes() -> None:
    assert build.stale() == [], "run `make dashboards` and commit deploy/grafana/"


def test_the_check_notices_a_hand_edit(tmp_path: Path) -> None:
    build.write(tmp_path)
    assert build.stale(tmp_path) == []
    edited = tmp_path / "quality.json"
    edited.write_text(edited.read_text().replace("noise floor", "noise flor", 1))
    assert build.stale(tmp_path) == [edited]


def test_every_panel_has_a_title_description_unit_and_query() -> None:
    for name, data in dashboards().items():
        panels = graph_panels(data)
        assert len(panels) >= 8, name
        for p in panels:
            assert p.get("title"), p
            assert len(str(p.get("description", ""))) > 20, f"{name}: {p['title']} has no description"
            assert p["fieldConfig"]["defaults"].get("unit"), f"{name}: {p['title']} has no unit"  # type: ignore[index]
            assert p["targets"], f"{name}: {p['title']} has no query"
            assert all(t["expr"] and t["legendFormat"] for t in p["targets"]), p["title"]  # type: ignore[attr-defined]


def test_panels_fit_the_grid_without_overlapping() -> None:
    for name, data in dashboards().items():
        taken: set[tuple[int, int]] = set()
        for p in build.panels_of(data):
            g = p["gridPos"]
            assert isinstance(g, dict)
            assert g["x"] >= 0, (name, p["title"])
            assert g["x"] + g["w"] <= 24, (name, p["title"])
            cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
            assert not cells & taken, f"{name}: {p['title']} overlaps another panel"
            taken |= cells


def test_tier_and_variant_are_template_variables_that_the_queries_use() -> None:
    for name, data in dashboards().items():
        templating = data["templating"]
        assert isinstance(templating, dict)
        assert {v["name"] for v in templating["list"]} >= {"datasource", "tier", "variant"}
        for p in graph_panels(data):
            for target in p["targets"]:  # type: ignore[attr-defined]
                # Engines have no tier; the fail-safe is one flag for the whole application.
                narrowed = "$tier" in target["expr"] or "$variant" in target["expr"]
                assert narrowed or p["title"] == "Rollout controller fail-safe", (name, p["title"])


def test_every_query_reads_only_metrics_that_exist() -> None:
    known = contract_names() | ray_names()
    assert "ray_vllm_num_requests_running" in known  # Ray's panels file still lists the engine metrics
    used: set[str] = set()
    for name, data in dashboards().items():
        for expr in expressions(data):
            names = metric_names(expr)
            assert names, expr
            assert names <= known, f"{name}: {sorted(names - known)} are neither in serving/metrics.py nor Ray's"
            used |= names
    assert {
        "ray_serving_score_drift_sum",
        "ray_serving_shadow_disagreements_total",
        "ray_vllm_kv_cache_usage_perc",
    } <= used


def test_the_name_check_can_fail() -> None:
    expr = 'sum(rate(serving_no_such_thing_total{tier="serving_x"}[5m]))'
    assert metric_names(expr) == {"serving_no_such_thing_total"}
    assert "serving_no_such_thing_total" not in contract_names() | ray_names()


def promtool_check(exprs: list[str], folder: Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    assert binary, "promtool is not installed; `make test` installs it (scripts/install-test-tools.sh)"
    rules = [{"record": f"dashboard_query_{i}", "expr": expand(e)} for i, e in enumerate(exprs)]
    path = folder / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    return subprocess.run([binary, "check", "rules", str(path)], capture_output=True, text=True, check=False)


def test_every_query_parses_in_promtool(tmp_path: Path) -> None:
    exprs = [e for data in dashboards().values() for e in expressions(data)]
    done = promtool_check(exprs, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(exprs)} rules found" in done.stdout


def test_promtool_refuses_a_broken_query(tmp_path: Path) -> None:
    done = promtool_check(["sum by (tier (rate(ray_serving_requests_total[5m]))"], tmp_path)
    assert done.returncode != 0


def test_quality_signals_sit_beside_the_configs_thresholds() -> None:
    rollback = build.rollback_config()
    steps: dict[str, list[float | None]] = {}
    for p in graph_panels(dashboards()["quality"]):
        defaults: dict[str, Any] = p["fieldConfig"]["defaults"]  # type: ignore[index]
        if "thresholds" in defaults:
            steps[str(p["title"])] = [s["value"] for s in defaults["thresholds"]["steps"]]
    assert steps["Candidate disagreement above the noise floor"][-1] == rollback.max_disagreement_rate
    assert steps["Candidate score drift above the noise floor"] == [
        None,
        pytest.approx(WARNING_SHARE * rollback.max_score_drift),
        rollback.max_score_drift,
    ]
    assert steps["Candidate override rate minus the baseline's"][-1] == rollback.max_override_rate_delta
    assert steps["Comparisons in the rollout's window"][-1] == rollback.min_samples


def test_thresholds_follow_the_config() -> None:
    changed = RollbackConfig(max_score_drift=0.7, window_s=120)
    text = json.dumps(build.render("quality", changed))
    assert "0.7" in text
    assert "[120s]" in text
    assert build.stale(rollback=changed), "a changed threshold must make the committed JSON stale"


def test_rollbacks_and_promotions_are_annotations() -> None:
    for data in dashboards().values():
        annotations = data["annotations"]
        assert isinstance(annotations, dict)
        by_name = {a["name"]: a for a in annotations["list"]}
        assert "ray_serving_rollbacks_total" in by_name["Rollbacks"]["expr"]
        assert "{{reason}}" in by_name["Rollbacks"]["titleFormat"]
        assert 'phase="promoted"' in by_name["Promotions"]["expr"]
