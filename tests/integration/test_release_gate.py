"""The release gate on the real tiny family: `serving evaluate` runs fp16, int8 and awq in real vLLM
engines, passes int8 and fails awq (random weights quantized to 4 bits drift far from fp16), writes the
report files, records the verdicts in the manifests, and `serving check` then refuses a gated tier that
gives awq weight and accepts one that gives int8 weight."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from serving.config import GateConfig
from serving.models import family, manifest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_evaluate_passes_int8_fails_awq_and_the_gate_then_refuses_awq(tiny_family: Path, tmp_path: Path) -> None:
    # A copy: the verdict is written into the candidate's manifest, and the session's family is shared.
    models = tmp_path / "tiny"
    for variant in family.TINY.variants:
        shutil.copytree(tiny_family / variant.folder, models / variant.folder)
    int8, awq = (models / family.TINY.variant(name).folder for name in ("int8", "awq"))
    out = tmp_path / "reports"
    done = subprocess.run(
        [sys.executable, "-m", "serving.ops.cli", "evaluate", str(int8), str(awq), "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1, done.stdout + done.stderr  # 1: evaluated, and one failed
    assert "[1/3] baseline fp16" in done.stdout  # one progress line per engine run
    assert "[2/3] candidate int8" in done.stdout
    assert "[3/3] candidate awq" in done.stdout
    assert "int8 against fp16: PASS" in done.stdout
    assert "awq against fp16: FAIL" in done.stdout

    report_path = out / "awq-vs-fp16.json"
    report = json.loads(report_path.read_text())
    for suffix in (".md", "-quality.png", "-drift.png", "-performance.png"):
        assert (out / f"awq-vs-fp16{suffix}").stat().st_size > 0
    assert "FAIL" in (out / "awq-vs-fp16.md").read_text().splitlines()[0]
    assert report["overall"]["items"] == report["eval_set"]["items"] == 100
    assert set(report["tasks"]) == {"fact", "instruction", "refusal"}
    # why it fails: the drift of awq's scores against fp16's is well above the default threshold
    assert report["overall"]["score_drift"] > GateConfig().max_score_drift
    assert not report["verdict"]["passed"]
    perf = report["performance"]
    for side in ("baseline", "candidate"):
        assert perf[side]["output_tokens_per_s"] > 0
        assert perf[side]["median_latency_s"] > 0
        assert perf[side]["rss_bytes"] > 2**20
    assert perf["candidate"]["weights_bytes"] < perf["baseline"]["weights_bytes"]  # 4-bit weights are smaller

    base_sha = manifest.read_manifest(models / "fp16")["weights_sha256"]
    gate = manifest.gate_for(manifest.read_manifest(awq, verify_weights=True), base_sha)
    assert gate is not None
    assert gate["passed"] is False
    assert gate["report"] == {"path": str(report_path), "sha256": manifest.file_sha256(report_path)}
    passed = manifest.gate_for(manifest.read_manifest(int8), base_sha)
    assert passed is not None
    assert passed["passed"] is True

    config = tmp_path / "gated.yaml"
    text = (REPO / "deploy" / "tiny.yaml").read_text().replace("../models/tiny", str(models))
    # the standard tier (baseline fp16) gated, with awq as its candidate
    text = text.replace("    candidate: int8\n", "    candidate: awq\n    require_gate: true\n", 1)
    config.write_text(text)
    refused = subprocess.run(
        [sys.executable, "-m", "serving.ops.cli", "check", str(config)], capture_output=True, text=True, check=False
    )
    assert refused.returncode == 2
    expected = "tier 'standard': candidate 'awq' may not get weight 50: it failed its release gate against 'fp16'"
    assert expected in refused.stderr
    config.write_text(
        text.replace("    candidate: awq\n    require_gate: true\n", "    candidate: int8\n    require_gate: true\n")
    )
    accepted = subprocess.run(
        [sys.executable, "-m", "serving.ops.cli", "check", str(config)], capture_output=True, text=True, check=False
    )
    assert accepted.returncode == 0, accepted.stderr
