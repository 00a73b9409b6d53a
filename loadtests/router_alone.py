"""The router's own cost, with the engines' CPU out of the picture: the router in front of instant engines.

    .venv/bin/python loadtests/router_alone.py [--seconds 10] [--markdown BENCHMARKS.md] [--profile results/prof]

Starts Ray Serve in this process with the router deployment (one replica) in front of instant engines: a
deployment per variant of the config that answers at once, with 32 words in 32 chunks (streamed) or one
response, through the same Ray Serve handles the real engines are called by. Beside it, in the same Serve
instance, a bare ingress: a plain FastAPI deployment that passes the request to the same instant engine
and its answer back, with none of the router's work (keys, routing, limits, metrics, signals). Then, for
each path, streaming and not, closed-loop clients (1, 4, 16 and 64 at a time) send chats for `--seconds`
each, in rounds that alternate the two paths.

It reports requests/s (the most, at 64 clients, is what one router replica can do here) and latency
p50/p99 at each load: with an instant engine, the whole latency is what the hops and the router add.
`router - bare` is the router's own code. With `--profile DIR`, py-spy records the router replica during
the first 16-client streaming run of the router (that cell then carries the sampler's cost) and writes its
flame graph there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request  # at module level: the ingress's annotations are resolved here
from fastapi.responses import JSONResponse, Response, StreamingResponse

sys.path.insert(0, str(Path(__file__).resolve().parent))
import profiling
from router_overhead import REPO, machine, write_markdown

BASE = "http://127.0.0.1:8000"
ANSWER = " ".join(f"word{i}" for i in range(32))
LOADS = (1, 4, 16, 64)
MARKERS = ("<!-- router-alone -->", "<!-- /router-alone -->")


def deploy(config_path: Path) -> None:
    import ray
    from ray import serve

    from serving.config import load_config
    from serving.deploy.app import Router
    from serving.intake.protocol import parse_request, sse
    from serving.ops.launch import set_fast_path_env
    from serving.rollout.controller import NAMESPACE
    from serving.variants.client import FakeVariant

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
    class InstantEngine:
        """Answers at once, as `LLMServer` answers: streamed SSE batches, or one response object."""

        def __init__(self, name: str) -> None:
            self.fake = FakeVariant(name, answer=ANSWER)

        async def chat(self, request: Any, raw_request_info: Any = None) -> Any:
            async for item in self.fake.call("chat", request):
                yield item

        async def completions(self, request: Any, raw_request_info: Any = None) -> Any:
            async for item in self.fake.call("completions", request):
                yield item

        async def generate_one_token(self) -> None:
            return None

        async def describe(self) -> dict[str, Any]:
            return await self.fake.describe()

    bare_app = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
    @serve.ingress(bare_app)
    class Bare:
        """The least an ingress in front of the engine does: validate the body, call, pass the answer back."""

        def __init__(self, engine: Any) -> None:
            self.engine = engine.options(stream=True)

        @bare_app.post("/v1/chat/completions")
        async def chat(self, request: Request) -> Response:
            parsed = parse_request("chat", await request.json())
            stream = self.engine.chat.remote(parsed, None)
            first = await anext(stream)
            if hasattr(first, "model_dump"):
                return JSONResponse(first.model_dump(mode="json", exclude_none=True))
            return StreamingResponse(sse(first, stream), media_type="text/event-stream")

    config = load_config(config_path)
    set_fast_path_env()  # as `serving serve` does
    ray.init(num_cpus=12, namespace=NAMESPACE, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    engines = {name: InstantEngine.options(name=f"instant-{name}").bind(name) for name in config.variants}  # type: ignore[attr-defined]
    # The router's queues as `serving serve` deploys them (config.router: 1000 at once), on one replica. Bound
    # without them it had Ray Serve's default of 5 requests at once, and at 16 and 64 clients the proxy held the
    # rest back: this benchmark then measured Serve's queue, not the router (2026-11-29: 30 answers/s for 200).
    options = {**config.router.deployment_options(), "num_replicas": 1}
    options.pop("autoscaling_config", None)
    router = Router.options(**options).bind(config.model_dump_json(), engines, {})  # type: ignore[attr-defined]
    serve.run(router, name="serving", route_prefix="/")
    bare_engine = InstantEngine.options(name="instant-bare").bind("fp16")  # type: ignore[attr-defined]
    serve.run(Bare.bind(bare_engine), name="bare", route_prefix="/bare")  # type: ignore[attr-defined]


async def load(url: str, clients: int, seconds: float, stream: bool) -> dict[str, Any]:
    """Closed-loop clients for `seconds`: each sends the next chat as soon as its last one is answered."""
    body = {"model": "demo-chat", "messages": [{"role": "user", "content": "hello"}], "stream": stream}
    headers = {"authorization": "Bearer demo-premium"}
    latencies: list[float] = []
    failed = 0
    first_failure = ""
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60, limits=limits) as http:

        async def client(i: int) -> None:
            nonlocal failed, first_failure
            while time.monotonic() < deadline:
                started = time.monotonic()
                async with http.stream("POST", "/v1/chat/completions", json={**body, "user": f"u{i}"}) as answer:
                    text = b"".join([chunk async for chunk in answer.aiter_bytes()])
                    if answer.status_code != 200:
                        failed += 1
                        first_failure = first_failure or f"{answer.status_code} {text[:300]!r}"
                        continue
                latencies.append(time.monotonic() - started)

        await asyncio.gather(*(client(i) for i in range(clients)))
    if not latencies:
        raise SystemExit(f"every request to {url} failed ({failed}); the first: {first_failure}")
    latencies.sort()
    return {
        "requests": len(latencies),
        "failed": failed,
        "rps": len(latencies) / seconds,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
    }


def measure(rounds: int, seconds: float, profile_dir: Path | None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for round_index in range(rounds):
        paths = [("router", BASE), ("bare", f"{BASE}/bare")]
        if round_index % 2:
            paths.reverse()
        for stream in (True, False):
            for clients in LOADS:
                for path, url in paths:
                    samplers = []
                    if profile_dir and path == "router" and stream and clients == 16 and round_index == 0:
                        samplers = profiling.start(
                            {"router-alone": "ServeReplica:serving:Router"}, seconds, profile_dir
                        )
                    result = asyncio.run(load(url, clients, seconds, stream))
                    for sampler in samplers:
                        sampler.wait()
                    row = {"round": round_index, "path": path, "stream": stream, "clients": clients, **result}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    table = []
    for stream in (True, False):
        for clients in LOADS:
            entry: dict[str, Any] = {"stream": stream, "clients": clients}
            for path in ("router", "bare"):
                mine = [r for r in rows if r["path"] == path and r["stream"] == stream and r["clients"] == clients]
                for metric in ("rps", "p50_ms", "p99_ms"):
                    entry[f"{path}_{metric}"] = statistics.median(r[metric] for r in mine)
                entry[f"{path}_failed"] = sum(r["failed"] for r in mine)
            table.append(entry)
    return table


def markdown(table: list[dict[str, Any]], about: dict[str, Any], rounds: int, seconds: float) -> str:
    lines = [
        MARKERS[0],
        f"Run {about['date']} on {about['cpu']} ({about['cores']} cores), Ray {about['ray']}: one router replica "
        f"in front of instant engines (32 words, in 32 chunks when streamed), closed-loop clients for {seconds:.0f} s "
        f"per cell, {rounds} rounds alternating the paths (medians). `bare` is a plain FastAPI ingress calling the "
        "same engine through the same handle: the difference is the router's own code.",
        "",
        "| stream | clients | router req/s | router p50 | router p99 | bare req/s | bare p50 | bare p99 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in table:
        stream = "yes" if e["stream"] else "no"
        router = f"{e['router_rps']:.0f} | {e['router_p50_ms']:.1f} ms | {e['router_p99_ms']:.1f} ms"
        bare = f"{e['bare_rps']:.0f} | {e['bare_p50_ms']:.1f} ms | {e['bare_p99_ms']:.1f} ms"
        lines.append(f"| {stream} | {e['clients']} | {router} | {bare} |")
    lines.append(MARKERS[1])
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--config", type=Path, default=REPO / "deploy/tiny.yaml")
    parser.add_argument("--out", type=Path, default=REPO / "results/router-alone.json")
    parser.add_argument("--markdown", type=Path, default=REPO / "BENCHMARKS.md")
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR")
    args = parser.parse_args()
    os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Ray's logging setup would log every request
    deploy(args.config)
    try:
        rows = measure(args.rounds, args.seconds, args.profile)
    finally:
        from ray import serve

        serve.shutdown()
    table = summarize(rows)
    about = machine()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": about, "table": table, "runs": rows}, indent=2))
    section = markdown(table, about, args.rounds, args.seconds)
    write_markdown(args.markdown, section, MARKERS)
    print(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
