"""What the router costs: vLLM's own benchmark against vLLM's own server and through the router, in one run.

    .venv/bin/python loadtests/router_overhead.py [--rounds 3] [--prompts 200] [--markdown BENCHMARKS.md]

On the tiny family (build it once: `.venv/bin/serving models build --family tiny`), it starts the demo
stack (`serving serve`, rollback off) and, beside it, vLLM's OpenAI server on the same fp16 weights with
the activation dtype the stack chose. Then, for each round, in an order that rotates from round to round,
`vllm bench serve` (random dataset, 64 tokens in, 32 out, streaming chat) runs against:

- `direct`: vLLM's server (a),
- `router`: the router with the premium key: every request on fp16, no shadow (b),
- `shadow`: the router with the standard key: every request on fp16, each one shadowed to int8 (c),

at 8 concurrent clients, and `router` and `shadow` again at 4. Each run's raw result (vLLM's JSON) is kept
under `--out`, with a summary (medians over rounds, ratios b/a and c/b, shadows shed) that also goes into
`--markdown` between the markers `<!-- router-overhead -->` and `<!-- /router-overhead -->`.

Absolute numbers on a shared 2-core machine are noise; the ratios, measured in one run with interleaved
rounds, are the result. The router-alone benchmark is `loadtests/router_alone.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))
import profiling

from serving.ops.launch import METRICS_REPORT_INTERVAL_MS

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
ROUTER = "http://127.0.0.1:8000"
DIRECT = "http://127.0.0.1:8100"
# Ray's metrics agent on this node (observability.metrics_port, fixed by `serving serve`): every router replica's
# metrics, summed here. Replicas hand over their samples every METRICS_REPORT_INTERVAL_MS, so a reading waits
# two intervals to include the requests that just ended.
METRICS = "http://127.0.0.1:8080/metrics"
EXPORT_WAIT_S = 2 * METRICS_REPORT_INTERVAL_MS / 1000
KEYS = {"router": "demo-premium", "shadow": "demo-standard", "direct": "none"}
MARKERS = ("<!-- router-overhead -->", "<!-- /router-overhead -->")
REPORTED = ("request_throughput", "output_throughput", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms",
            "p99_tpot_ms", "median_e2el_ms", "p99_e2el_ms")  # fmt: skip


def bench_config(family_dir: Path, state_dir: Path, stream_batching_ms: float | None = None) -> dict[str, Any]:
    """deploy/tiny.yaml on the family in `family_dir`, with the standard tier on fp16 alone, every request
    shadowed to int8, no rollback."""
    config: dict[str, Any] = yaml.safe_load((REPO / "deploy/tiny.yaml").read_text())
    for variant in config["variants"].values():
        variant["path"] = str((family_dir / Path(variant["path"]).name).resolve())
        if stream_batching_ms is not None:
            variant["stream_batching_ms"] = stream_batching_ms
    config["tiers"]["standard"].update(weight=0.0, shadow={"target": "int8", "rate": 1.0})
    config["rollback"].update(enabled=False, state_file=str(state_dir / "rollout-state.json"))
    return config


def wait_for(url: str, process: subprocess.Popen[bytes], what: str, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{what} exited with {process.returncode} before it was ready")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"{what} was not ready within {timeout_s:.0f} s")


def start(command: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    print(f"starting: {' '.join(command)} (log {log})", flush=True)
    return subprocess.Popen(
        command, cwd=REPO, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True
    )


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def stack_facts() -> dict[str, Any]:
    models = httpx.get(f"{ROUTER}/v1/models", headers={"authorization": "Bearer demo-premium"}, timeout=30).json()
    facts: dict[str, Any] = models["data"][0]["variants"]["fp16"]
    return facts


def direct_server(fp16: Path, dtype: str, max_model_len: int, log: Path) -> subprocess.Popen[bytes]:
    """vLLM's own server as the stack runs its fp16 engine: same weights, dtype, eager mode, KV cache and
    one OpenMP thread, unbound (as the stack's engines are on a 2-core node)."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"}
    command = [PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", str(fp16)]
    command += ["--served-model-name", "demo-chat", "--host", "127.0.0.1", "--port", DIRECT.rsplit(":", 1)[1]]
    command += ["--dtype", dtype, "--max-model-len", str(max_model_len), "--enforce-eager"]
    return start(command, log, env)


def bench(target: str, concurrency: int, prompts: int, tokenizer: Path, out: Path, name: str) -> dict[str, Any]:
    base = DIRECT if target == "direct" else ROUTER
    command = [PYTHON, str(REPO / "loadtests/vllm_cli.py"), "bench", "serve", "--backend", "openai-chat"]
    command += ["--endpoint", "/v1/chat/completions", "--base-url", base, "--model", "demo-chat"]
    command += ["--tokenizer", str(tokenizer), "--dataset-name", "random", "--random-input-len", "64"]
    command += ["--random-output-len", "32", "--ignore-eos", "--num-prompts", str(prompts)]
    command += ["--max-concurrency", str(concurrency), "--percentile-metrics", "ttft,tpot,itl,e2el"]
    command += ["--metric-percentiles", "50,99", "--disable-tqdm", "--save-result", "--result-dir", str(out)]
    command += ["--result-filename", f"{name}.json", "--seed", "0"]
    env = {**os.environ, "OPENAI_API_KEY": KEYS[target]}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"vllm bench serve against {target} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads((out / f"{name}.json").read_text())
    if result.get("failed"):
        raise SystemExit(f"{result['failed']} requests failed against {target} (run {name})")
    return result


def shadow_counts() -> dict[str, float]:
    """Shadow comparisons made and shadows dropped (by reason), from every router replica's metrics."""
    time.sleep(EXPORT_WAIT_S)
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(METRICS, timeout=10).text):
        for sample in family.samples:
            if sample.name == "ray_serving_shadow_comparisons_total":
                counts["compared"] = counts.get("compared", 0.0) + sample.value
            elif sample.name == "ray_serving_shadow_dropped_total":
                key = f"dropped_{sample.labels.get('reason')}"
                counts[key] = counts.get(key, 0.0) + sample.value
    return counts


def idle_check(requests: int = 10) -> dict[str, float]:
    """Shadows are shed under load; one client at a time, with pauses, leaves room for every one of them."""
    before = shadow_counts()
    body = {"model": "demo-chat", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}
    for i in range(requests):
        answer = httpx.post(
            f"{ROUTER}/v1/chat/completions",
            json={**body, "user": f"idle-{i}"},
            headers={"authorization": f"Bearer {KEYS['shadow']}"},
            timeout=60,
        )
        answer.raise_for_status()
        time.sleep(1.5)
    time.sleep(3)
    after = shadow_counts()
    counts = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    print(f"one client at a time, {requests} requests: shadows {counts}", flush=True)
    if counts.get("compared", 0.0) < requests * 0.8 or counts.get("dropped_failed", 0.0):
        raise SystemExit(f"shadows did not run when the stack was idle: {counts}")
    return counts


def runs_of(concurrency: int) -> list[str]:
    return ["direct", "router", "shadow"] if concurrency == 8 else ["router", "shadow"]


def measure(rounds: int, prompts: int, tokenizer: Path, out: Path) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Every run of every round, in an order that rotates each round; and the shadows of an idle stack."""
    results: list[dict[str, Any]] = []
    for target in ("direct", "router", "shadow"):  # warm-up, discarded
        bench(target, 8, 40, tokenizer, out, f"warmup-{target}")
    time.sleep(5)  # shadows of the warm-up finish
    idle = idle_check()
    for round_index in range(rounds):
        for concurrency in (8, 4):
            targets = runs_of(concurrency)
            shift = round_index % len(targets)
            for target in targets[shift:] + targets[:shift]:
                before = shadow_counts()
                name = f"r{round_index}-c{concurrency}-{target}"
                result = bench(target, concurrency, prompts, tokenizer, out, name)
                time.sleep(3)  # the last shadows finish before the counts are read
                after = shadow_counts()
                shadows = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
                row = {"round": round_index, "concurrency": concurrency, "target": target, "shadows": shadows}
                row.update({k: result[k] for k in REPORTED})
                results.append(row)
                print(f"{name}: {row['request_throughput']:.1f} req/s, TTFT p50 {row['median_ttft_ms']:.0f} ms, "
                      f"p99 {row['p99_ttft_ms']:.0f} ms, e2e p50 {row['median_e2el_ms']:.0f} ms, "
                      f"shadows {shadows}", flush=True)  # fmt: skip
    return results, idle


def profile(tokenizer: Path, out: Path, prompts: int) -> None:
    """A pass of its own after the measured rounds: py-spy on the router, the proxy and the fp16 engine's
    replica while `vllm bench serve` runs against the router at 8 clients."""
    samplers = profiling.start(profiling.STACK_PROCESSES, 20, out / "profile")
    bench("router", 8, prompts, tokenizer, out, "profiled-router")
    for sampler in samplers:
        sampler.wait()
    for name in profiling.STACK_PROCESSES:
        collapsed = out / "profile" / f"{name}.txt"
        if collapsed.exists():
            print(f"== {name}: frames holding the most samples")
            for frame, share in profiling.top_frames(collapsed):
                print(f"  {share:5.1%}  {frame[:140]}")


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over rounds per (concurrency, target), and the ratios the issue asks for."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for row in results:
        grouped.setdefault(f"c{row['concurrency']}-{row['target']}", []).append(row)
    medians: dict[str, dict[str, float]] = {}
    for key, rows in grouped.items():
        medians[key] = {k: statistics.median(r[k] for r in rows) for k in REPORTED}
        if key.endswith("shadow"):
            shed = sum(sum(v for k, v in r["shadows"].items() if k.startswith("dropped")) for r in rows)
            compared = sum(r["shadows"].get("compared", 0.0) for r in rows)
            medians[key]["shadows_compared"] = compared
            medians[key]["shadows_shed_share"] = shed / (shed + compared) if shed + compared else 0.0

    def ratio(a: str, b: str, metric: str) -> float:
        return round(medians[a][metric] / medians[b][metric], 3)

    ratios = {
        "router/direct throughput (c8)": ratio("c8-router", "c8-direct", "request_throughput"),
        "router/direct p99 TTFT (c8)": ratio("c8-router", "c8-direct", "p99_ttft_ms"),
        "router/direct p50 TTFT (c8)": ratio("c8-router", "c8-direct", "median_ttft_ms"),
        "shadow/router throughput (c8)": ratio("c8-shadow", "c8-router", "request_throughput"),
    }
    for c in (4, 8):
        ratios[f"shadow/router p50 latency (c{c})"] = ratio(f"c{c}-shadow", f"c{c}-router", "median_e2el_ms")
        ratios[f"shadow/router p99 latency (c{c})"] = ratio(f"c{c}-shadow", f"c{c}-router", "p99_e2el_ms")
    return {"medians": medians, "ratios": ratios}


def machine() -> dict[str, Any]:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")), "")
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "vllm": metadata.version("vllm-cpu"),
        "ray": metadata.version("ray"),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def markdown(summary: dict[str, Any], about: dict[str, Any], rounds: int, prompts: int) -> str:
    lines = [
        MARKERS[0],
        f"Run {about['date']} on {about['cpu']} ({about['cores']} cores), vLLM {about['vllm']}, Ray {about['ray']}, "
        f"Python {about['python']}: {rounds} interleaved rounds of {prompts} prompts each (medians over rounds), "
        "tiny family fp16, random dataset 64 in / 32 out, streaming chat, `vllm bench serve`.",
        "",
        "| path | clients | req/s | out tok/s | TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 | e2e p50 | e2e p99 "
        "| shadows shed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    names = {"direct": "(a) vLLM directly", "router": "(b) router, no shadow", "shadow": "(c) router, shadow 1.0"}
    for key, m in summary["medians"].items():
        concurrency, target = key.split("-", 1)
        shed = ""
        if "shadows_shed_share" in m:
            shed = f"{m['shadows_shed_share']:.0%} ({m['shadows_compared']:.0f} compared)"
        lines.append(
            f"| {names[target]} | {concurrency[1:]} | {m['request_throughput']:.1f} | {m['output_throughput']:.0f} "
            f"| {m['median_ttft_ms']:.0f} ms | {m['p99_ttft_ms']:.0f} ms | {m['median_tpot_ms']:.1f} ms "
            f"| {m['p99_tpot_ms']:.1f} ms | {m['median_e2el_ms']:.0f} ms | {m['p99_e2el_ms']:.0f} ms | {shed} |"
        )  # fmt: skip
    idle = summary["idle_shadows"]
    lines += [
        "",
        f"With one client at a time (16-token chats, 1.5 s apart) on the shadowing tier, {idle.get('compared', 0):.0f} "
        f"of 10 shadows were compared and {sum(v for k, v in idle.items() if k.startswith('dropped')):.0f} shed.",
    ]
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {name} | {value:.2f} |" for name, value in summary["ratios"].items()]
    lines.append(MARKERS[1])
    return "\n".join(lines)


def write_markdown(path: Path, section: str, markers: tuple[str, str] = MARKERS) -> None:
    """Replaces the section between the markers, or appends it."""
    text = path.read_text() if path.exists() else ""
    if markers[0] in text and markers[1] in text:
        head, rest = text.split(markers[0], 1)
        text = head + section + rest.split(markers[1], 1)[1]
    else:
        text += ("\n" if text else "") + section + "\n"
    path.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--family-dir", type=Path, default=REPO / "models/tiny")
    parser.add_argument("--out", type=Path, default=REPO / "results/router-overhead")
    parser.add_argument("--markdown", type=Path, default=REPO / "BENCHMARKS.md")
    parser.add_argument("--profile", action="store_true", help="then py-spy the router, proxy and engine replica")
    parser.add_argument(
        "--stream-batching-ms", type=float, default=None, help="every variant's, instead of the config's"
    )
    parser.add_argument("--stack-env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable for the stack (e.g. to try a Ray Serve setting)")  # fmt: skip
    args = parser.parse_args()
    fp16 = args.family_dir / "fp16"
    if not (fp16 / "config.json").is_file():
        raise SystemExit(f"no tiny family at {args.family_dir}: `.venv/bin/serving models build --family tiny`")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / "bench.yaml"
        config = bench_config(args.family_dir, Path(tmp), args.stream_batching_ms)
        config_path.write_text(yaml.safe_dump(config))
        stack_env = {**os.environ, **dict(item.split("=", 1) for item in args.stack_env)}
        command = [str(REPO / ".venv/bin/serving"), "serve", "--config", str(config_path)]
        stack = start(command, args.out / "stack.log", stack_env)
        direct = None
        try:
            wait_for(f"{ROUTER}/ready", stack, "the stack")
            facts = stack_facts()
            max_model_len = config["variants"]["fp16"].get("max_model_len", 1024)
            direct = direct_server(fp16, facts["dtype"], max_model_len, args.out / "direct.log")
            wait_for(f"{DIRECT}/health", direct, "vLLM's server")
            results, idle = measure(args.rounds, args.prompts, fp16, args.out)
            if args.profile:
                profile(fp16, args.out, 4 * args.prompts)
        finally:
            for process in (direct, stack):
                if process is not None:
                    stop(process)
    summary = {**summarize(results), "idle_shadows": idle}
    about = machine()
    (args.out / "summary.json").write_text(json.dumps({"machine": about, **summary, "runs": results}, indent=2))
    section = markdown(summary, about, args.rounds, args.prompts)
    write_markdown(args.markdown, section)
    print(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
