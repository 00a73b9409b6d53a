"""Measures what the shadow comparisons see on a model family: disagreement, token agreement and score
drift of each quantized variant against fp16, and of fp16 against itself (the noise floor), through the
real stack (Ray Serve, the router, the vLLM CPU engines), the same signals the rollback checks judge.

    .venv/bin/python loadtests/quality.py [--config deploy/demo.yaml] [--pairs 200] [--out results/quality-smol.json]

It serves the config's variants under a measurement config of its own (every request shadowed; no
rollback), in two phases: fp16 paired with itself (noise floor), then each candidate (as primary, as in
the demo's tiers) against fp16. Requests are the evaluation set's prompts (`evals/demo.jsonl`), each
asked plainly and with a system prompt, greedy, so each pair is measured on distinct real requests.
It keeps sending until every pair has `--pairs` comparisons, then writes the means and counts as JSON.
The thresholds in deploy/demo.yaml are derived from these numbers (README, "The demo model families").
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import yaml
from prometheus_client.parser import text_string_to_metric_families

from serving.config import hash_key
from serving.engine.hardware import host
from serving.evals import load_eval_set
from serving.ops.launch import METRICS_REPORT_INTERVAL_MS

REPO = Path(__file__).resolve().parents[1]
PORT, METRICS_PORT = 18_421, 18_422
SYSTEM = "Answer in one or two sentences."


def measurement_config(config_path: Path, scratch: Path, candidates: list[str], noise_floor: bool) -> Path:
    """The served config with its variants (absolute paths) and measurement tiers: one per candidate, with
    the candidate as baseline shadowed against fp16, or (noise floor) fp16 shadowed against itself."""
    config = yaml.safe_load(config_path.read_text())
    variants = {
        name: {**spec, "path": str((config_path.parent / spec["path"]).resolve())}
        for name, spec in config["variants"].items()
    }
    tiers = (
        {"floor": {"baseline": "fp16", "shadow": {"target": "fp16", "rate": 1.0}}}
        if noise_floor
        else {name: {"baseline": name, "shadow": {"target": "fp16", "rate": 1.0}} for name in candidates}
    )
    tiers_used = ["floor", *candidates]
    measured = {
        "model": config["model"],
        "variants": variants,
        "tiers": tiers,
        "keys": [{"sha256": hash_key(f"quality-{tier}"), "tenant": "quality", "tier": tier} for tier in tiers_used],
        "shadowing": {"max_concurrency": 16, "noise_floor_rate": 1.0 if noise_floor else 0.0},
        "rollback": {"enabled": False, "state_file": str(scratch / "rollout-state.json")},
        "observability": {"metrics_host": "127.0.0.1", "metrics_port": METRICS_PORT},
        "server": {"host": "127.0.0.1", "port": PORT},
    }
    # Every tier exists in both phases (the applied config must keep the keys' tiers valid).
    for tier in tiers_used:
        measured["tiers"].setdefault(tier, {"baseline": "fp16"})
    path = scratch / "quality.yaml"
    path.write_text(yaml.safe_dump(measured, sort_keys=False))
    return path


def requests() -> list[list[dict[str, str]]]:
    prompts = [item.prompt for item in load_eval_set()]
    plain = [[{"role": "user", "content": p}] for p in prompts]
    framed = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": p}] for p in prompts]
    return plain + framed


def scrape() -> list[tuple[str, dict[str, str], float]]:
    """Every sample of Ray's metrics agent on this node (all router replicas), once the last requests are in it."""
    time.sleep(2 * METRICS_REPORT_INTERVAL_MS / 1000)
    text = httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).text
    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]


def pair_stats(primary: str, target: str) -> dict[str, float]:
    def total(name: str) -> float:
        return sum(v for n, labels, v in samples if n == name and labels.get("primary") == primary
                   and labels.get("shadow") == target)  # fmt: skip

    samples = scrape()
    n = total("ray_serving_shadow_comparisons_total")
    drift_n = total("ray_serving_score_drift_count")
    return {
        "comparisons": n,
        "disagreement_rate": total("ray_serving_shadow_disagreements_total") / n if n else float("nan"),
        "token_agreement": total("ray_serving_token_agreement_ratio_sum") / n if n else float("nan"),
        "score_drift": total("ray_serving_score_drift_sum") / drift_n if drift_n else float("nan"),
        "scored": drift_n,
    }


def drive(key: str, pair: tuple[str, str], wanted: int, max_tokens: int) -> dict[str, float]:
    """Sends the requests round and round (2 at a time, so shadows are not dropped) until the pair has
    `wanted` comparisons."""
    api = openai.OpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key=key, max_retries=2, timeout=300)
    pool = itertools.cycle(enumerate(requests()))

    def one(item: tuple[int, list[dict[str, str]]]) -> None:
        index, messages = item
        api.chat.completions.create(
            model="demo-chat",
            messages=messages,  # type: ignore[arg-type]
            max_tokens=max_tokens,
            temperature=0,
            user=f"q-{index}",
        )

    started = time.monotonic()
    with ThreadPoolExecutor(2) as workers:
        while (done := pair_stats(*pair)["comparisons"]) < wanted:
            list(workers.map(one, [next(pool) for _ in range(8)]))
            print(f"  {pair[0]} vs {pair[1]}: {done:.0f}/{wanted} comparisons ({time.monotonic() - started:.0f} s)")
    time.sleep(3)  # the last comparisons are finishing off the response path
    return pair_stats(*pair)


def serve(config: Path, log: Path) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, "-m", "serving.ops.cli", "serve", "--config", str(config)],
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO,
    )  # fmt: skip
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{PORT}/ready", timeout=5).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise SystemExit(f"the stack did not become ready; see {log}")


def apply(config: Path) -> None:
    subprocess.run([sys.executable, "-m", "serving.ops.cli", "apply", str(config)], check=True, cwd=REPO)
    time.sleep(5)  # the routers take the new config within a second or two


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "deploy" / "demo.yaml")
    parser.add_argument("--pairs", type=int, default=200, help="comparisons per pair (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, help="default: results/quality-<folder of the fp16 variant's family>.json")
    args = parser.parse_args()
    config_path = args.config.resolve()
    variants = yaml.safe_load(config_path.read_text())["variants"]
    candidates = [n for n in variants if n != "fp16"]
    family_dir = (config_path.parent / variants["fp16"]["path"]).parent
    out = args.out or REPO / "results" / f"quality-{family_dir.resolve().name}.json"

    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        log = scratch / "serve.log"
        print(f"serving {family_dir.resolve()} for the measurement (log: {log})")
        process = serve(measurement_config(config_path, scratch, candidates, noise_floor=True), log)
        results: dict[str, Any] = {}
        try:
            results["fp16_vs_fp16"] = drive("quality-floor", ("fp16", "fp16"), args.pairs, args.max_tokens)
            apply(measurement_config(config_path, scratch, candidates, noise_floor=False))
            for name in candidates:
                results[f"{name}_vs_fp16"] = drive(f"quality-{name}", (name, "fp16"), args.pairs, args.max_tokens)
        finally:
            os.killpg(process.pid, signal.SIGINT)
            process.wait(timeout=120)
    report = {
        "family": str(family_dir.resolve().relative_to(REPO)) if family_dir.resolve().is_relative_to(REPO) else "",
        "config": str(args.config),
        "max_tokens": args.max_tokens,
        "machine": host(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "pairs": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for pair, found in results.items():
        print(
            f"{pair:14} n={found['comparisons']:.0f} disagreement {found['disagreement_rate']:.3f} "
            f"token agreement {found['token_agreement']:.3f} drift {found['score_drift']:.4f}"
        )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
