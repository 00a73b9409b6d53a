"""Load scenarios on the real stack, with the official `openai` client: steady, burst, a weight change
under load, and a rollback drill. Every request is written down, and the run is summed up and plotted.

    .venv/bin/python loadtests/scenarios.py [--scenarios steady,burst,weight-change,rollback-drill]
        [--seconds 60] [--max-requests 2000] [--out results/loadtests/NAME] [--family-dir models/tiny]

It starts `serving serve` on the tiny family (deploy/tiny.yaml, rollback on, the batch tier's awq candidate
at weight 0 with every answer shadowed), on loopback only, and runs the chosen scenarios one after another,
each for `--seconds` (the whole run stops at `--max-requests`):

- `steady`: 2 clients, back to back, on the premium, standard and batch keys;
- `burst`: 10 clients at once;
- `weight-change`: steady, and halfway through the standard tier's int8 weight goes 50 -> 80 by editing the
  config and `serving apply` (a vertical line on the plot);
- `rollback-drill` (2.5 times as long: the candidate must collect `min_samples` comparisons): steady, and
  after half of `--seconds` the batch tier's awq candidate (4-bit, genuinely worse on the tiny family) gets
  weight 50; the rollout controller rolls it back by itself (a red line).

What it writes under `--out`: requests.jsonl (one line per request: time, scenario, tier, variant from the
response's x-served-variant header, HTTP status, TTFT, latency, output tokens), events.jsonl (scenario
starts, weight changes, rollbacks), summary.md (a table per scenario, tier and variant, and the events)
and latency.png (latency over time per variant, events marked). See loadtests/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import openai
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadreport
from router_overhead import start, stop, wait_for

from serving.evals import load_eval_set

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"  # loopback only: the stack is bound here, and nothing else is called
PORT = 8000
BASE = f"http://{HOST}:{PORT}"
KEYS = {"premium": "demo-premium", "standard": "demo-standard", "batch": "demo-batch"}
ADMIN = {"authorization": "Bearer demo-admin"}
SCENARIOS = ("steady", "burst", "weight-change", "rollback-drill")
STEADY_CLIENTS, BURST_CLIENTS = 2, 10
DRILL_LENGTH = 2.5  # the rollback drill runs this many times --seconds


@dataclass(frozen=True)
class Record:
    t: float  # unix time the request was sent
    scenario: str
    tier: str
    variant: str | None  # the x-served-variant header; None when the request failed before an answer
    status: int | str  # HTTP status, or the client-side failure's name
    ttft_s: float | None
    latency_s: float
    output_tokens: int
    complete: bool  # an answer whose stream ended with its usage chunk (a stream cut short has none)


class Run:
    def __init__(self, out: Path, config_path: Path, config: dict[str, Any], max_requests: int) -> None:
        self.out, self.config_path, self.config = out, config_path, config
        self.max_requests = max_requests
        self.requests = (out / "requests.jsonl").open("w")
        self.events = (out / "events.jsonl").open("w")
        self.sent = 0
        self.prompts = [item.prompt for item in load_eval_set()]
        self.clients = {
            tier: openai.AsyncOpenAI(base_url=f"{BASE}/v1", api_key=key, max_retries=0, timeout=120)
            for tier, key in KEYS.items()
        }

    def event(self, kind: str, detail: str, at: float | None = None) -> None:
        line = {"t": at or time.time(), "kind": kind, "detail": detail}
        self.events.write(json.dumps(line) + "\n")
        self.events.flush()
        print(f"[{datetime.now(UTC):%H:%M:%S}] {kind}: {detail}", flush=True)

    async def one(self, scenario: str, rng: random.Random) -> None:
        tier = rng.choice(list(KEYS))
        sent, started = time.time(), time.monotonic()
        variant: str | None = None
        status: int | str = 200
        ttft: float | None = None
        tokens = 0
        complete = False
        try:
            async with self.clients[tier].chat.completions.with_streaming_response.create(
                model="demo-chat",
                messages=[{"role": "user", "content": rng.choice(self.prompts)}],
                max_tokens=32,
                temperature=0,
                user=f"user-{rng.randrange(1000)}",  # sticky: many users, so each tier's split shows
                stream=True,
                stream_options={"include_usage": True},
            ) as response:
                variant = response.headers.get("x-served-variant")
                async for chunk in await response.parse():
                    if ttft is None and chunk.choices and chunk.choices[0].delta.content:
                        ttft = time.monotonic() - started
                    if chunk.usage is not None:
                        tokens, complete = chunk.usage.completion_tokens, True
        except openai.APIStatusError as exc:
            status = exc.status_code
        except (openai.APIError, httpx.HTTPError) as exc:
            status = type(exc).__name__
        record = Record(sent, scenario, tier, variant, status, ttft, time.monotonic() - started, tokens, complete)
        self.requests.write(json.dumps(asdict(record)) + "\n")

    async def load(self, scenario: str, seconds: float, clients: Callable[[float], int]) -> None:
        """Closed-loop clients until the time or the request budget is spent; `clients(elapsed)` says how
        many run at each moment (a burst is a step in it)."""
        self.event("scenario", f"{scenario} ({seconds:.0f} s)")
        began = time.monotonic()

        async def client(index: int) -> None:
            rng = random.Random(f"{scenario}-{index}")
            while (elapsed := time.monotonic() - began) < seconds and self.sent < self.max_requests:
                if index >= clients(elapsed):
                    await asyncio.sleep(0.2)
                    continue
                self.sent += 1
                await self.one(scenario, rng)

        await asyncio.gather(*(client(i) for i in range(max(clients(t) for t in range(int(seconds) + 1)))))

    async def apply(self, tier: str, weight: float) -> None:
        """Edits the config file and applies it with the documented command, as an operator would."""
        self.config["tiers"][tier]["weight"] = weight
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        command = [sys.executable, "-m", "serving.ops.cli", "apply", str(self.config_path)]
        done = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"serving apply failed: {done.stdout}{done.stderr}")
        candidate = self.config["tiers"][tier]["candidate"]
        self.event("weight", f"{tier}: {candidate} -> {weight:g} %")

    async def watch_rollback(self, tier: str, until: float) -> None:
        """Polls the rollout status; marks the rollback at the controller's own time for it."""
        phase = "?"
        async with httpx.AsyncClient(base_url=BASE, headers=ADMIN, timeout=30) as http:
            while time.monotonic() < until:
                status = (await http.get("/admin/rollout")).json()["tiers"][tier]
                phase = status["phase"]
                if phase == "rolled_back":
                    last = status["history"][-1]
                    self.event("rollback", f"{tier}: {last['candidate']} ({', '.join(last['reasons'])})", last["at"])
                    return
                await asyncio.sleep(1)
        self.event("no-rollback", f"{tier}: still {phase} at the end of the drill")

    async def scenario(self, name: str, seconds: float) -> None:
        steady = lambda _: STEADY_CLIENTS  # noqa: E731
        if name == "steady":
            await self.load(name, seconds, steady)
        elif name == "burst":  # quiet, a burst in the middle third, quiet again
            await self.load(name, seconds, lambda t: BURST_CLIENTS if seconds / 3 <= t < 2 * seconds / 3 else 1)
        elif name == "weight-change":

            async def change() -> None:
                await asyncio.sleep(seconds / 2)
                await self.apply("standard", 80.0)

            await asyncio.gather(self.load(name, seconds, steady), change())
        elif name == "rollback-drill":  # longer: the candidate needs min_samples comparisons to be judged
            length = DRILL_LENGTH * seconds

            async def drill() -> None:
                await asyncio.sleep(seconds / 2)
                await self.apply("batch", 50.0)
                await self.watch_rollback("batch", time.monotonic() + length - seconds / 2)

            await asyncio.gather(self.load(name, length, steady), drill())

    async def all(self, names: list[str], seconds: float) -> None:
        """One event loop for the whole run: the clients' connection pools belong to it."""
        for name in names:
            await self.scenario(name, seconds)

    def close(self) -> None:
        self.requests.close()
        self.events.close()


def run_config(family_dir: Path, state_dir: Path) -> dict[str, Any]:
    """deploy/tiny.yaml on `family_dir`: rollback on, the batch tier's awq candidate at weight 0 with every
    answer shadowed (so the drill's candidate is judged within a minute)."""
    config: dict[str, Any] = yaml.safe_load((REPO / "deploy/tiny.yaml").read_text())
    for variant in config["variants"].values():
        variant["path"] = str((family_dir / Path(variant["path"]).relative_to("../models/tiny")).resolve())
    config["tiers"]["batch"].update(weight=0.0, shadow={"target": "fp16", "rate": 1.0})
    config["rollback"].update(enabled=True, state_file=str(state_dir / "rollout-state.json"))
    config["server"] = {"host": HOST, "port": PORT}
    return config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated, run in this order")
    parser.add_argument("--seconds", type=float, default=60, help="per scenario")
    parser.add_argument("--max-requests", type=int, default=4000, help="for the whole run")
    parser.add_argument("--family-dir", type=Path, default=REPO / "models/tiny")
    parser.add_argument("--out", type=Path, help="default: results/loadtests/<UTC time>")
    args = parser.parse_args()
    chosen = args.scenarios.split(",")
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}; choose from {', '.join(SCENARIOS)}")
    out: Path = args.out or REPO / "results" / "loadtests" / f"{datetime.now(UTC):%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    state = Path(tempfile.mkdtemp(prefix="loadtest-state-"))
    config = run_config(args.family_dir, state)
    config_path = state / "config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    stack = start([sys.executable, "-m", "serving.ops.cli", "serve", "--config", str(config_path)], out / "serve.log")
    run = Run(out, config_path, config, args.max_requests)
    try:
        wait_for(f"{BASE}/ready", stack, "the stack")
        asyncio.run(run.all(chosen, args.seconds))
    finally:
        run.close()
        stop(stack)
    summary = loadreport.write(out)
    print(summary)
    print(f"wrote {out}/requests.jsonl, events.jsonl, summary.md, latency.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
