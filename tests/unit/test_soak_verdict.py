"""The soak run's verdict (loadtests/soak.py), on made-up statuses and requests: what counts as lost."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "loadtests"))
from soak import outcome, verdict


def request(status: int | str, complete: bool = True) -> dict[str, Any]:
    return {"status": status, "complete": complete}


def status(batch_phase: str = "rolled_back", int8_rollback: bool = False, int8_judged: bool = True) -> dict[str, Any]:
    rollback = {"kind": "rollback", "at": 200.0, "reasons": ["score_drift"], "weight_before": 50.0}
    judged = {"check": "score_drift", "value": 0.01 if int8_judged else None, "samples": 40}
    return {
        "tiers": {
            "batch": {"phase": batch_phase, "history": [{**rollback, "candidate": "awq"}], "checks": []},
            "standard": {
                "phase": "progressing",
                "history": [{**rollback, "candidate": "int8"}] if int8_rollback else [],
                "checks": [judged],
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
    assert not verdict(status(int8_rollback=True), requests, since=100.0)[0]
    assert not verdict(status(int8_judged=False), requests, since=100.0)[0]
    assert not verdict(status(), [*requests, request(200, complete=False)], since=100.0)[0]
    assert verdict(status(), requests, since=300.0)[1].startswith("VERDICT: FAIL: awq on batch NOT rolled back")
