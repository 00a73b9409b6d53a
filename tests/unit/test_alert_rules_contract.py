"""The shipped alert rules against the metrics contract and the demo config: every rule has a severity,
summary and runbook, reads metrics that exist, is unit-tested firing and not firing, and its rollback
numbers are deploy/demo.yaml's. (promtool runs the rules' own tests: tests/integration/test_alert_rules.py.)"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from serving.dashboards import build
from tests.unit.test_dashboards import contract_names, metric_names, ray_names

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"


def rules() -> dict[str, dict[str, Any]]:
    groups = yaml.safe_load((RULES / "alerts.yml").read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"]}


def unit_tests() -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = yaml.safe_load((RULES / "alerts_test.yml").read_text())["tests"]
    return found


def test_every_rule_has_a_severity_summary_and_runbook() -> None:
    assert len(rules()) >= 11
    for name, rule in rules().items():
        assert rule["labels"]["severity"] in {"page", "ticket"}, name
        assert rule["annotations"]["summary"], name
        assert len(rule["annotations"]["runbook"]) > 30, name


def test_the_issue_s_alerts_are_there() -> None:
    assert set(rules()) >= {
        "ServingRolloutFailSafe",
        "ServingCanaryRolledBack",
        "ServingCandidateScoreDriftNearThreshold",
        "ServingCandidateDisagreementNearThreshold",
        "ServingRolloutNotJudging",
        "ServingErrorRateHigh",
        "ServingP99LatencyHigh",
        "ServingShadowDropsHigh",
        "ServingTargetDown",
        "ServingRouterMetricsAbsent",
        "ServingEngineMetricsAbsent",
    }


def test_every_rule_is_tested_firing_and_not_firing() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for test in unit_tests():
        for check in test.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert set(rules()) - firing == set(), "rules never tested firing"
    assert set(rules()) - quiet == set(), "rules never tested staying quiet"


def test_every_rule_reads_metrics_that_exist() -> None:
    known = contract_names() | ray_names() | {"up"}
    for name, rule in rules().items():
        used = metric_names(rule["expr"]) | ({"up"} if re.search(r"\bup\{", rule["expr"]) else set())
        assert used, name
        assert used <= known, f"{name}: {sorted(used - known)} are neither exported nor Ray's"


def test_rollback_numbers_are_the_demo_config_s() -> None:
    rollback = build.rollback_config()
    drift = rules()["ServingCandidateScoreDriftNearThreshold"]["expr"]
    disagreement = rules()["ServingCandidateDisagreementNearThreshold"]["expr"]
    for expr in (drift, disagreement):
        assert set(re.findall(r"\[(\d+)s\]", expr)) == {str(round(rollback.window_s))}
        assert f">= {rollback.min_samples}" in expr
    assert drift.rstrip().endswith(f"> 0.8 * {rollback.max_score_drift}")
    assert disagreement.rstrip().endswith(f"> 0.8 * {rollback.max_disagreement_rate}")
    assert rules()["ServingErrorRateHigh"]["expr"].rstrip().endswith(f"> {rollback.max_error_rate}")
    assert f"> 3 * {rollback.interval_s:g} + 60" in rules()["ServingRolloutNotJudging"]["expr"]


def test_the_unit_tests_catch_a_wrong_threshold(tmp_path: Path) -> None:
    binary = shutil.which("promtool")
    assert binary, "promtool is not installed; `make test` installs it (scripts/install-test-tools.sh)"
    shutil.copy(RULES / "alerts_test.yml", tmp_path)
    loosened = (RULES / "alerts.yml").read_text().replace("> 0.8 * 0.2", "> 0.8 * 0.5")
    assert loosened != (RULES / "alerts.yml").read_text()
    (tmp_path / "alerts.yml").write_text(loosened)
    done = subprocess.run(
        [binary, "test", "rules", "alerts_test.yml"], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert done.returncode != 0
    assert "ServingCandidateScoreDriftNearThreshold" in done.stdout + done.stderr
