"""The soak run: minutes of mixed traffic on every tier of the demo stack, with one engine replica killed and
one rollout-controller restart in between, and a verdict on what the rollout must do through both.

    .venv/bin/python loadtests/soak.py [--minutes 20] [--twin] [--out results/loadtests/soak-NAME]
        [--family-dir models/tiny]

It starts `serving serve` on the tiny family as `scenarios.py` does (deploy/tiny.yaml, rollback on, every
batch answer shadowed), with the batch tier's awq candidate at weight 50 from the start and half the standard
tier's answers shadowed (so int8 is judged within minutes), and runs 2 closed-loop clients (streamed chat,
all three tiers at random) for `--minutes`. At a third of the run the fp16 engine replica is killed, at two
thirds the rollout controller, both through Ray's API by actor handle (tests/chaos.py, as
tests/integration/test_rollback.py does); Ray Serve and Ray start new ones.

The verdict (last line printed, and the exit code: 0 pass, 1 fail) holds three things:
- awq on batch was rolled back by the controller;
- int8 on standard was never rolled back, and was judged (at least one check had enough samples);
- no request was lost: each one is a complete answer (a 200 whose stream ended with its usage chunk) or a
  clear error (an HTTP error status, or an error event in the stream), never a dropped connection, a
  timeout or a stream cut short.

With `--twin` the standard tier's candidate is `fp16-twin`, a second engine serving the very same fp16 weights
as the baseline (int8, then needed by no tier, is left out and batch's baseline is fp16): nothing separates
the two but chance and cold starts, so any rollback of the twin is a false one. The twin's replica is also
killed, at half the run, so its cold start falls inside the judged window. The verdict then asks that awq
was rolled back, that the twin was never rolled back and was judged by a latency check (TTFT or TPOT with
enough samples), and that no request was lost.

Under `--out`: requests.jsonl and events.jsonl (the kills, the controller's rollbacks and every replica start
it saw), summary.md (with the verdict) and latency.png, as `scenarios.py` writes them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadreport
from router_overhead import start, stop, wait_for
from scenarios import ADMIN, BASE, REPO, STEADY_CLIENTS, Run, run_config

sys.path.insert(0, str(REPO))
from tests.chaos import kill_controller, kill_replica

SCENARIO = "soak"
KILLED = "variant-fp16"  # the baseline of premium and standard, and the shadows' target: the hardest to lose
TWIN = "fp16-twin"  # with --twin: standard's candidate, the fp16 weights in an engine of their own
CONTROLLER = "controller"
LATENCY_CHECKS = ("ttft_ratio", "tpot_ratio")


def soak_config(family_dir: Path, state_dir: Path, twin: bool = False) -> dict[str, Any]:
    config = run_config(family_dir, state_dir)
    config["tiers"]["batch"]["weight"] = 50.0
    config["tiers"]["standard"]["shadow"]["rate"] = 0.5
    if twin:
        # Three engines as without --twin: int8 would serve no tier, so it makes room for the twin.
        variants = config["variants"]
        config["variants"] = {"fp16": variants["fp16"], TWIN: dict(variants["fp16"]), "awq": variants["awq"]}
        config["tiers"]["standard"]["candidate"] = TWIN
        config["tiers"]["batch"]["baseline"] = "fp16"
    return config


def chaos_plan(twin: bool = False) -> list[tuple[float, str]]:
    """What is killed, at which fraction of the run: a replica's deployment, or the controller. With --twin
    the twin's replica too, so that the candidate's own cold start is in the window."""
    twin_kill = [(1 / 2, f"variant-{TWIN}")] if twin else []
    return [(1 / 3, KILLED), *twin_kill, (2 / 3, CONTROLLER)]


class Soak(Run):
    def __init__(self, *args: Any, twin: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.twin = twin
        self.started_at = time.time()
        self.seen: set[tuple[str, float]] = set()  # (kind, controller time) of events already written
        self.status: dict[str, Any] = {}

    async def chaos(self, seconds: float) -> None:
        """The fp16 replica killed at a third of the run (with --twin the twin's at half), the controller at
        two thirds."""
        began = time.monotonic()
        for fraction, target in chaos_plan(self.twin):
            await asyncio.sleep(max(0.0, began + fraction * seconds - time.monotonic()))
            if target == CONTROLLER:
                await asyncio.to_thread(kill_controller)
                self.event("kill", "the rollout controller (Ray's API); Ray restarts it")
            else:
                await asyncio.to_thread(kill_replica, target)
                self.event("kill", f"one {target} replica (Ray's API)")

    async def watch(self, seconds: float) -> None:
        """Polls the rollout status (failures while the controller restarts are expected) and writes down, at
        the controller's own times, every rollback, step and promotion, and every replica start it saw."""
        ends = time.monotonic() + seconds
        async with httpx.AsyncClient(base_url=BASE, headers=ADMIN, timeout=30) as http:
            while time.monotonic() < ends:
                try:
                    self.status = (await http.get("/admin/rollout")).raise_for_status().json()
                except (httpx.HTTPError, ValueError):
                    await asyncio.sleep(1)
                    continue
                self.note(self.status)
                await asyncio.sleep(2)

    def note(self, status: dict[str, Any]) -> None:
        for tier, record in status["tiers"].items():
            for e in record["history"]:
                key = (f"{tier}-{e.get('kind')}", e["at"])
                if e["at"] < self.started_at or key in self.seen:
                    continue
                self.seen.add(key)
                kind = e.get("kind", "rollback")
                if kind == "rollback":
                    detail = f"{tier}: {e['candidate']} {e['weight_before']:g}% -> 0 ({', '.join(e['reasons'])})"
                    self.event("rollback", detail, e["at"])
                else:
                    self.event(kind, f"{tier}: {e['candidate']} ({e.get('by', '')})", e["at"])
            for warm in record.get("left_out", []):
                key = (f"start-{warm['variant']}", warm["start"])
                if warm["start"] >= self.started_at and key not in self.seen:
                    self.seen.add(key)
                    self.event("replica-start", f"{warm['variant']} replica {warm['replica']}", warm["start"])

    async def soak(self, seconds: float) -> None:
        await asyncio.gather(
            self.load(SCENARIO, seconds, lambda _: STEADY_CLIENTS), self.chaos(seconds), self.watch(seconds)
        )
        async with httpx.AsyncClient(base_url=BASE, headers=ADMIN, timeout=30) as http:
            self.status = (await http.get("/admin/rollout")).raise_for_status().json()
        self.note(self.status)


def outcome(request: dict[str, Any]) -> str:
    """complete, error (clear: an HTTP status, or an error event in the stream) or lost."""
    if request["status"] == 200:
        return "complete" if request["complete"] else "lost"
    if isinstance(request["status"], int) or request["status"] == "APIError":
        return "error"
    return "lost"  # a dropped connection, a timeout: the client cannot tell what happened


def verdict(
    status: dict[str, Any], requests: list[dict[str, Any]], since: float, twin: bool = False
) -> tuple[bool, str]:
    """With `twin`, standard's candidate (the baseline's own weights) must have been judged on latency."""
    candidate = TWIN if twin else "int8"
    batch, standard = status["tiers"]["batch"], status["tiers"]["standard"]
    rollbacks = {
        tier: [
            e for e in status["tiers"][tier]["history"] if e.get("kind", "rollback") == "rollback" and e["at"] >= since
        ]
        for tier in ("batch", "standard")
    }
    awq = [e for e in rollbacks["batch"] if e["candidate"] == "awq"]
    judged = [
        f"{c['check']} n={c['samples']}"
        for c in standard["checks"]
        if c["value"] is not None and (not twin or c["check"] in LATENCY_CHECKS)
    ]
    outcomes = Counter(outcome(r) for r in requests)
    errors = Counter(str(r["status"]) for r in requests if outcome(r) == "error")
    parts = [
        (
            bool(awq) and batch["phase"] == "rolled_back",
            f"awq on batch rolled back ({', '.join(awq[0]['reasons'])})" if awq else "awq on batch NOT rolled back",
        ),
        (
            not rollbacks["standard"] and bool(judged),
            # Once rolled back the candidate's checks are no longer shown: the rollback's own reasons are.
            f"{candidate} on standard ROLLED BACK ({', '.join(rollbacks['standard'][0]['reasons'])})"
            if rollbacks["standard"]
            else f"{candidate} on standard never rolled back"
            f" ({'judged: ' + ', '.join(judged) if judged else 'NEVER JUDGED' + (' ON LATENCY' if twin else '')})",
        ),
        (
            outcomes["lost"] == 0,
            f"{len(requests)} requests: {outcomes['complete']} complete, {outcomes['error']} clear errors"
            f"{' (' + ', '.join(f'{k} x{v}' for k, v in sorted(errors.items())) + ')' if errors else ''},"
            f" {outcomes['lost']} lost",
        ),
    ]
    passed = all(ok for ok, _ in parts) and outcomes["complete"] > 0
    return passed, f"VERDICT: {'PASS' if passed else 'FAIL'}: " + "; ".join(text for _, text in parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=20, help="of traffic (the stack's start comes first)")
    parser.add_argument("--max-requests", type=int, default=100_000, help="a bound, not a target")
    parser.add_argument("--family-dir", type=Path, default=REPO / "models/tiny")
    parser.add_argument("--out", type=Path, help="default: results/loadtests/soak-<UTC time>")
    parser.add_argument(
        "--twin", action="store_true", help="standard's candidate serves the baseline's own fp16 weights (not int8)"
    )
    args = parser.parse_args()
    out: Path = args.out or REPO / "results" / "loadtests" / f"soak-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    state = Path(tempfile.mkdtemp(prefix="soak-state-"))
    config = soak_config(args.family_dir, state, args.twin)
    config_path = state / "config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    stack = start([sys.executable, "-m", "serving.ops.cli", "serve", "--config", str(config_path)], out / "serve.log")
    run = Soak(out, config_path, config, args.max_requests, twin=args.twin)
    import ray

    from serving.rollout.controller import NAMESPACE

    try:
        wait_for(f"{BASE}/ready", stack, "the stack")
        ray.init(address="auto", namespace=NAMESPACE, log_to_driver=False, logging_level=logging.WARNING)
        run.started_at = time.time()
        asyncio.run(run.soak(args.minutes * 60))
    finally:
        run.close()
        ray.shutdown()
        stop(stack)
    requests = loadreport.read(out / "requests.jsonl")
    passed, line = (
        verdict(run.status, requests, run.started_at, args.twin) if run.status else (False, "VERDICT: FAIL: no status")
    )
    summary = loadreport.write(out)
    (out / "summary.md").write_text(f"{summary}\n{line}\n")
    print(summary)
    print(f"wrote {out}/requests.jsonl, events.jsonl, summary.md, latency.png")
    print(line)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
