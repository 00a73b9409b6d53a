"""The soak run (loadtests/soak.py): its verdict on made-up statuses and requests (what counts as lost, what
--twin asks), and the config it writes, through the server's own loader."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from serving.config import load_config

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "loadtests"))
from soak import KILLED, TWIN, chaos_plan, outcome, soak_config, verdict


def request(status: int | str, complete: bool = True) -> dict[str, Any]:
    return {"status": status, "complete": complete}


def status(
    batch_phase: str = "rolled_back",
    int8_rollback: bool = False,
    int8_judged: bool = True,
    candidate: str = "int8",
    checks: tuple[str, ...] = ("score_drift",),
) -> dict[str, Any]:
    rollback = {"kind": "rollback", "at": 200.0, "reasons": ["score_drift"], "weight_before": 50.0}
    judged = [{"check": c, "value": 0.01 if int8_judged else None, "samples": 40} for c in checks]
    return {
        "tiers": {
            "batch": {"phase": batch_phase, "history": [{**rollback, "candidate": "awq"}], "checks": []},
            "standard": {
                "phase": "progressing",
                "history": [{**rollback, "candidate": candidate}] if int8_rollback else [],
                "checks": judged,
            },
        }
    }


def test_a_complete_answer_or_a_clear_error_is_not_lost() -> None:
    assert outcome(request(200)) == "complete"
    assert outcome(request(503)) == "error"
    assert outcome(request("APIError")) == "error"  # an error event in the stream
    assert outcome(request(200, complete=False)) == "lost"  # a stream cut short
    assert outcome(request("APIConnectionError")) == "lost"
    assert outcome(request("APITimeoutError")) == "lost"


def test_the_verdict_passes_only_when_all_three_hold() -> None:
    requests = [request(200)] * 10 + [request(503)]
    passed, line = verdict(status(), requests, since=100.0)
    assert passed, line
    assert line == (
        "VERDICT: PASS: awq on batch rolled back (score_drift); int8 on standard never rolled back "
        "(judged: score_drift n=40); 11 requests: 10 complete, 1 clear errors (503 x1), 0 lost"
    )
    assert not verdict(status(batch_phase="progressing"), requests, since=100.0)[0]
    passed, line = verdict(status(int8_rollback=True, int8_judged=False), requests, since=100.0)
    assert not passed
    assert "int8 on standard ROLLED BACK (score_drift)" in line  # why, not the checks it no longer shows
    assert not verdict(status(int8_judged=False), requests, since=100.0)[0]
    assert not verdict(status(), [*requests, request(200, complete=False)], since=100.0)[0]
    assert verdict(status(), requests, since=300.0)[1].startswith("VERDICT: FAIL: awq on batch NOT rolled back")


def test_under_twin_the_candidate_must_be_judged_on_latency() -> None:
    requests = [request(200)] * 10
    latency = status(candidate=TWIN, checks=("score_drift", "ttft_ratio"))
    passed, line = verdict(latency, requests, since=100.0, twin=True)
    assert passed, line
    assert "fp16-twin on standard never rolled back (judged: ttft_ratio n=40)" in line
    # Judged on quality only, a twin proves nothing about cold starts.
    passed, line = verdict(status(candidate=TWIN), requests, since=100.0, twin=True)
    assert not passed
    assert "fp16-twin on standard never rolled back (NEVER JUDGED ON LATENCY)" in line
    tripped = status(candidate=TWIN, checks=("tpot_ratio",), int8_rollback=True)
    assert "fp16-twin on standard ROLLED BACK" in verdict(tripped, requests, since=100.0, twin=True)[1]
    assert not verdict(tripped, requests, since=100.0, twin=True)[0]
    assert not verdict(
        {**latency, "tiers": {**latency["tiers"], "batch": status("progressing")["tiers"]["batch"]}},
        requests,
        since=100.0,
        twin=True,
    )[0]
    assert not verdict(latency, [*requests, request("APITimeoutError")], since=100.0, twin=True)[0]


def write(config: dict[str, Any], tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_the_twin_config_is_one_the_server_loads(tmp_path: Path) -> None:
    family = tmp_path / "tiny"
    config = load_config(write(soak_config(family, tmp_path, twin=True), tmp_path))
    assert sorted(config.variants) == ["awq", "fp16", TWIN]  # three engines, as without --twin: int8 left out
    fp16, twin = config.variants["fp16"], config.variants[TWIN]
    assert twin == fp16  # the very same weights and settings
    assert twin.path == (family / "fp16").resolve()
    standard, batch = config.tiers["standard"], config.tiers["batch"]
    assert (standard.baseline, standard.candidate, standard.weight) == ("fp16", TWIN, 50.0)
    assert standard.shadow is not None
    assert standard.shadow.target == "fp16"
    assert (batch.baseline, batch.candidate, batch.weight) == ("fp16", "awq", 50.0)
    assert config.tiers["premium"].forbid == ("awq",)
    assert config.rollback.enabled


def test_the_plain_config_still_judges_int8(tmp_path: Path) -> None:
    config = load_config(write(soak_config(tmp_path / "tiny", tmp_path), tmp_path))
    assert sorted(config.variants) == ["awq", "fp16", "int8"]
    assert config.tiers["standard"].candidate == "int8"


def test_the_twin_replica_is_killed_between_the_other_two_faults() -> None:
    assert chaos_plan() == [(1 / 3, KILLED), (2 / 3, "controller")]
    assert chaos_plan(twin=True) == [(1 / 3, KILLED), (1 / 2, "variant-fp16-twin"), (2 / 3, "controller")]
