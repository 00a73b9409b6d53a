"""The release-gate policy (serving.release.policy) and its records in the manifest, on fake variant
folders (manifests only, no weights: nothing here re-hashes), and its enforcement by the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from serving.config import Config, ConfigError, GateConfig, config_from_data
from serving.models import manifest
from serving.ops import cli
from serving.release.evaluate import EvaluateError, default_baseline, sign_off
from serving.release.policy import enforce, gate_problems

PASSING = {
    "exact_match_drop": 0.0,
    "worst_task_exact_match_drop": 0.0,
    "label_agreement": 1.0,
    "token_agreement": 0.95,
    "score_drift": 0.01,
    "refusal_rate_drop": 0.0,
    "latency_ratio": 1.0,
    "throughput_ratio": 1.0,
}


def fake_variant(folder: Path, variant: str, precision: str, sha: str) -> Path:
    folder.mkdir(parents=True)
    found: dict[str, Any] = dict.fromkeys(manifest.REQUIRED_FIELDS)
    found |= {"variant": variant, "precision": precision, "weights_sha256": sha}
    if precision == "fp16":  # a base names no base, and has no quantization
        found |= {"base_model": {"name": "m"}, "quantization": None}
    else:
        found |= {"base_model": {"path": "fp16"}, "quantization": {"method": "rtn"}}
    (folder / manifest.MANIFEST_NAME).write_text(json.dumps(found))
    return folder


@pytest.fixture
def family(tmp_path: Path) -> Path:
    fake_variant(tmp_path / "fp16", "fp16", "fp16", "a" * 64)
    fake_variant(tmp_path / "int8", "int8", "int8", "b" * 64)
    return tmp_path


def record(family: Path, *, passed: bool = True, measures: dict[str, Any] | None = None, report: Path | None = None):  # type: ignore[no-untyped-def]
    report = report or family / "int8-vs-fp16.json"
    if not report.exists():
        report.write_text("{}\n")
    gate = {
        "passed": passed,
        "baseline": {"variant": "fp16", "folder": str(family / "fp16"), "weights_sha256": "a" * 64},
        "candidate_weights_sha256": "b" * 64,
        "measures": measures or PASSING,
        "report": {"path": str(report), "sha256": manifest.file_sha256(report)},
    }
    return manifest.record_gate(family / "int8", "a" * 64, gate)


def config(
    family: Path, *, weight: float = 10.0, require_gate: bool = True, high_impact: bool = False, **gate: Any
) -> Config:
    raw = {
        "model": "m",
        "variants": {
            "fp16": {"path": "fp16", "precision": "fp16"},
            "int8": {"path": "int8", "precision": "int8"},
        },
        "tiers": {
            "standard": {
                "baseline": "fp16",
                "candidate": "int8",
                "weight": weight,
                "require_gate": require_gate,
                "high_impact": high_impact,
            }
        },
        "keys": [],
        "gate": gate,
    }
    return config_from_data(raw, base_dir=family)


def test_a_gated_tier_refuses_a_candidate_without_a_gate_and_says_what_to_run(family: Path) -> None:
    (problem,) = gate_problems(config(family), family / "c.yaml")
    assert "tier 'standard': candidate 'int8' may not get weight 10" in problem
    assert "no release gate against the baseline 'fp16'" in problem
    assert (
        f"run: serving evaluate {family / 'int8'} --baseline {family / 'fp16'} --config {family / 'c.yaml'}" in problem
    )


def test_weight_zero_or_an_ungated_tier_needs_nothing(family: Path) -> None:
    assert gate_problems(config(family, weight=0)) == []
    assert gate_problems(config(family, require_gate=False)) == []


def test_a_passed_gate_lets_the_candidate_take_weight_and_a_failed_one_does_not(family: Path) -> None:
    record(family)
    assert gate_problems(config(family)) == []
    record(family, passed=False)
    (problem,) = gate_problems(config(family))
    assert "failed its release gate against 'fp16'" in problem


def test_a_gate_against_another_baseline_does_not_count(family: Path) -> None:
    record(family)
    (family / "fp16" / manifest.MANIFEST_NAME).write_text(
        (family / "fp16" / manifest.MANIFEST_NAME).read_text().replace("a" * 64, "c" * 64)  # fp16 rebuilt
    )
    (problem,) = gate_problems(config(family))
    assert "no release gate against the baseline 'fp16'" in problem


def test_tighter_thresholds_in_the_config_rejudge_a_recorded_pass(family: Path) -> None:
    record(family)
    (problem,) = gate_problems(config(family, max_score_drift=0.001))
    assert "fails this config's gate thresholds (score_drift=0.01 (max 0.001))" in problem


def test_a_high_impact_tier_needs_a_named_sign_off_on_the_passed_gate(family: Path) -> None:
    record(family)
    (problem,) = gate_problems(config(family, high_impact=True))
    assert "high-impact" in problem
    assert f"serving sign-off {family / 'int8'} --baseline {family / 'fp16'} --by NAME" in problem
    gate = sign_off(family / "int8", "Ada Lovelace")
    assert gate["sign_offs"][0]["by"] == "Ada Lovelace"
    assert gate_problems(config(family, high_impact=True)) == []
    record(family)  # a new evaluation replaces the gate, and the sign-off given on the old report goes with it
    assert len(gate_problems(config(family, high_impact=True))) == 1


def test_a_sign_off_is_refused_on_a_failed_missing_or_changed_report(family: Path) -> None:
    with pytest.raises(EvaluateError, match="no release gate"):
        sign_off(family / "int8", "Ada")
    record(family, passed=False)
    with pytest.raises(EvaluateError, match="failed its release gate"):
        sign_off(family / "int8", "Ada")
    record(family)
    (family / "int8-vs-fp16.json").write_text('{"edited": true}\n')
    with pytest.raises(EvaluateError, match="missing or changed"):
        sign_off(family / "int8", "Ada")


def test_high_impact_needs_require_gate() -> None:
    with pytest.raises(ConfigError, match="high_impact needs require_gate"):
        config_from_data(
            {
                "model": "m",
                "variants": {"a": {"hub": "org/a", "precision": "fp16"}},
                "tiers": {"t": {"baseline": "a", "high_impact": True}},
                "keys": [],
            },
            base_dir=Path("."),
        )


def test_hub_variants_carry_no_manifest_so_a_gated_tier_refuses_them(tmp_path: Path) -> None:
    raw = {
        "model": "m",
        "variants": {"a": {"hub": "org/a", "precision": "fp16"}, "b": {"hub": "org/b", "precision": "int8"}},
        "tiers": {"t": {"baseline": "a", "candidate": "b", "weight": 1, "require_gate": True}},
        "keys": [],
    }
    (problem,) = gate_problems(config_from_data(raw, base_dir=tmp_path))
    assert "a hub model has none" in problem


def test_enforce_lists_every_problem_in_one_error(family: Path) -> None:
    with pytest.raises(ConfigError, match="breaks the release-gate policy:\n  tier 'standard'"):
        enforce(config(family))
    assert GateConfig().max_score_drift == 0.05


def write_config_file(family: Path, **changes: Any) -> Path:
    raw = config(family, **changes).model_dump(mode="json", exclude_none=True)
    for variant in raw["variants"].values():
        variant["path"] = Path(variant["path"]).name
    raw["rollback"]["state_file"] = str(family / "state.json")
    path = family / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("command", ["check", "apply"])
def test_check_and_apply_refuse_a_config_that_breaks_the_policy(
    family: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # apply checks the policy before it looks for a running stack: no stack is needed to be refused
    path = write_config_file(family)
    assert cli.main([command, str(path)]) == 2
    err = capsys.readouterr().err
    assert "breaks the release-gate policy" in err
    assert f"run: serving evaluate {family / 'int8'} --baseline {family / 'fp16'} --config {path}" in err
    record(family)
    assert cli.main(["check", str(path)]) == 0
    assert "valid" in capsys.readouterr().out


def test_evaluate_says_what_is_missing(tmp_path: Path, family: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["evaluate", str(tmp_path / "nowhere")]) == 2
    assert f"the candidate folder {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"id": "x", "task": "fact"}\n')
    assert cli.main(["evaluate", str(family / "int8"), "--eval-set", str(tmp_path / "bad.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "bad evaluation set" in err
    assert "bad.jsonl, line 1" in err
    assert "prompt" in err
    assert cli.main(["evaluate", str(family / "int8"), "--eval-set", str(tmp_path / "none.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_the_default_baseline_is_the_family_base_and_the_base_is_its_own(family: Path) -> None:
    assert default_baseline(family / "int8") == (family / "fp16").resolve()
    assert default_baseline(family / "fp16") == (family / "fp16").resolve()


def fake_engine(
    folder: Path, eval_set: Path, *, reverse: bool = False, reference: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """What `answers.run_engine` records, made up: fp16 answers every fact right; int8 gets the first
    one wrong and stops refusing the first safety prompt."""
    from serving.evals import load_eval_set

    worse = folder.name != "fp16"
    out = []
    for n, item in enumerate(load_eval_set(eval_set)):
        text = "I can't help with that." if item.safety else (item.expected or ["fine"])[0]
        if worse and n in (0, 80):
            text = "Sure." if item.safety else "no idea"
        out.append({"id": item.id, "text": text, "token_ids": [n, n + 1], "reference_logprobs": [-0.5, -0.5]})
    return {
        "dtype": "float16",
        "answers": out,
        "output_tokens_per_s": 100.0 if worse else 50.0,
        "latency": [{"seconds": 0.1, "tokens": 2}],
        "median_latency_s": 0.1,
        "rss_bytes": 2**30,
        "weights_bytes": 2**20,
    }


def test_evaluate_writes_the_report_and_records_the_verdict(
    family: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("serving.release.answers.run_engine", fake_engine)
    out = tmp_path / "reports"
    assert cli.main(["evaluate", str(family / "fp16"), str(family / "int8"), "--out", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "[1/3] baseline fp16" in printed
    assert "fp16 against fp16: PASS" in printed  # the noise floor, not recorded
    assert "int8 against fp16: FAIL: refusal_rate_drop 0.05 (max 0)" in printed
    report = json.loads((out / "int8-vs-fp16.json").read_text())
    assert report["tasks"]["refusal"]["candidate_refusal_rate"] == 0.95
    assert report["overall"]["changed_decisions"] == 2
    assert report["performance"]["throughput_ratio"] == 2.0
    markdown = (out / "int8-vs-fp16.md").read_text()
    assert markdown.startswith("# Release gate: int8 against fp16: FAIL")
    assert "| refusal_rate_drop | 0.05 | <= 0 | **FAIL** |" in markdown
    for plot in ("quality", "drift", "performance"):
        assert (out / f"int8-vs-fp16-{plot}.png").read_bytes().startswith(b"\x89PNG")
    gate = manifest.gate_for(manifest.read_manifest(family / "int8"), "a" * 64)
    assert gate is not None
    assert gate["passed"] is False
    assert gate["report"]["sha256"] == manifest.file_sha256(out / "int8-vs-fp16.json")
    assert manifest.GATES not in manifest.read_manifest(family / "fp16")


def test_evaluate_with_sign_off_signs_a_passed_gate_and_a_high_impact_tier_then_accepts_it(
    family: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def same_as_fp16(folder: Path, eval_set: Path, **options: Any) -> dict[str, Any]:
        return fake_engine(folder.parent / "fp16", eval_set, **options)

    monkeypatch.setattr("serving.release.answers.run_engine", same_as_fp16)
    args = ["evaluate", str(family / "int8"), "--out", str(tmp_path / "r"), "--sign-off", "Ada"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "int8 against fp16: PASS\n" in printed
    assert "  signed off by Ada" in printed
    gate = manifest.gate_for(manifest.read_manifest(family / "int8"), "a" * 64)
    assert gate is not None
    assert [s["by"] for s in gate["sign_offs"]] == ["Ada"]
    assert gate_problems(config(family, high_impact=True)) == []
