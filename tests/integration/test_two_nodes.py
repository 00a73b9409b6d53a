"""The demo on a Ray cluster of two nodes on this machine (`ray start --head`, then `ray start --address`
with a custom resource of its own), deployed onto it with `serving serve --address`: two router replicas,
fp16 pinned to the head node, int8 and awq to the second node (the config's `resources`). Traffic runs
through the official `openai` client while the second node's raylet is killed and the node started again.
What users see: every call answered within its timeout, failures as OpenAI-shaped 503s (and Serve's plain
500 for the calls a router replica on the lost node held when it died, if it ran there), the head's
variant answering while the node is gone, the second node's variants back once it returns (its replicas'
placement groups, pending while it is gone, are placed on it as soon as it joins); and a real Prometheus,
discovering its targets from the file Ray writes, scrapes both nodes' metrics agents.

The cluster is this module's own (its temp dir, ports, and the processes this test starts), so it runs
beside the session's `stack` fixture, and it is stopped by the process ids started here: `ray stop`
would stop every Ray on the machine, other clusters included. Ray's logs and what Ray said last are kept
in the test's folder under pytest's base temp dir.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil  # type: ignore[import-untyped]
import pytest
import yaml

from serving.config import load_config
from tests.integration.conftest import run_prometheus, write_config

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
# Fixed ports between Ray's default worker port range (10002-19999: where the workers of a Ray started with its
# defaults, such as the session's `stack`, bind random ports) and the kernel's ephemeral range (32768-60999: every
# port Ray picks itself), so neither this cluster nor the session's stack can take the other's ports.
HTTP_PORT = 22_500  # Serve's proxy, on the head node only (both nodes share this machine's address)
GCS_PORT = 22_501
DASHBOARD_PORT = 22_502  # loopback; its reporter writes the Prometheus service-discovery file
CLIENT_PORT = 22_503
PROMETHEUS_PORT = 22_504
# Each node's own ports: metrics agent (Prometheus target), dashboard agent, runtime-env agent, raylet.
NODE_PORTS = {"head": 22_510, "worker": 22_520}
# Ray refuses fixed ports inside a node's worker port range: each node gets its own range, clear of the above.
WORKER_PORTS = {"head": (21_000, 21_499), "worker": (21_500, 21_999)}
PORT_FLAGS = (
    "--metrics-export-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--runtime-env-agent-port",
    "--node-manager-port",
    "--object-manager-port",
)
ON_HEAD, ON_WORKER = ("fp16",), ("int8", "awq")
BASE = f"http://127.0.0.1:{HTTP_PORT}"
# The GCS pings every raylet each second and declares a node dead after 5 failed pings in a row (~6 s here, so
# the lost node's replicas are replaced early); a ping waits up to 5 s, so a busy but live raylet is not dead.
HEALTH_CHECKS = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "5000",
    "RAY_health_check_failure_threshold": "5",
}
# Every client call is bounded: a call that takes longer counts as a hang. Calls that wait for a replacement
# router (both router replicas may run on the lost node) took up to 21 s.
CALL_TIMEOUT_S = 60.0


@dataclass
class Cluster:
    folder: Path
    temp_dir: Path
    nodes: dict[str, subprocess.Popen[bytes]]
    # Ray's token authentication, on as a cluster should run (and as Ray turns it on by itself wherever
    # ~/.ray/auth_token exists): every process of this test's cluster, and every client of it, gets this token.
    token: str = field(default_factory=lambda: secrets.token_hex(32))
    dashboard: str = f"http://127.0.0.1:{DASHBOARD_PORT}"

    def env(self) -> dict[str, str]:
        return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, **HEALTH_CHECKS}


def node_args(name: str, temp_dir: Path) -> list[str]:
    ports = [arg for i, flag in enumerate(PORT_FLAGS) for arg in (flag, str(NODE_PORTS[name] + i))]
    low, high = WORKER_PORTS[name]
    ports += [f"--min-worker-port={low}", f"--max-worker-port={high}"]
    common = ["--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}", "--object-store-memory=200000000", *ports]
    if name == "head":
        return [
            "--head",
            f"--port={GCS_PORT}",
            f"--ray-client-server-port={CLIENT_PORT}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={DASHBOARD_PORT}",
            # Replicas hand their metrics to their node's agent every second (Ray's default: 10 s).
            '--system-config={"metrics_report_interval_ms": 1000}',
            "--num-cpus=6",
            '--resources={"node_a": 8}',
            *common,
        ]
    return [f"--address=127.0.0.1:{GCS_PORT}", "--num-cpus=4", '--resources={"node_b": 8}', *common]


def start_node(cluster: Cluster, name: str) -> None:
    """`ray start --block`: the node's processes are children of the one process started here."""
    log = (cluster.folder / f"{name}.log").open("a")
    assert name not in cluster.nodes or cluster.nodes[name].poll() is not None
    cluster.nodes[name] = subprocess.Popen(
        [str(BIN / "ray"), "start", "--block", "--disable-usage-stats", *node_args(name, cluster.temp_dir)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=cluster.env(),
    )
    log.close()


def node_processes(process: subprocess.Popen[bytes]) -> list[psutil.Process]:
    try:
        root = psutil.Process(process.pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def stop_node(process: subprocess.Popen[bytes]) -> None:
    """Stops one node by the ids of the processes this test started (and theirs), never by name."""
    processes = node_processes(process)
    for p in processes:
        with_gone(p.send_signal, signal.SIGTERM)
    _, alive = psutil.wait_procs(processes, timeout=20)
    for p in alive:
        with_gone(p.kill)
    psutil.wait_procs(alive, timeout=10)


def memory_gib(cluster: Cluster) -> float:
    """What this test's cluster holds in memory (proportional set size: shared pages counted once)."""
    total = 0
    for process in [p for node in cluster.nodes.values() for p in node_processes(node)]:
        with contextlib.suppress(psutil.Error):
            total += process.memory_full_info().pss
    return total / 2**30


def with_gone(call: Callable[..., None], *args: object) -> None:
    with contextlib.suppress(psutil.NoSuchProcess):
        call(*args)


def poll(
    what: str, check: Callable[[], bool], timeout_s: float, *, every_s: float = 1.0, seen: Callable[[], object] = str
) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, (
            f"not within {timeout_s:.0f} s: {what}; seen: {seen()} (last state API error: {STATE_ERROR})"
        )
        time.sleep(every_s)


STATE_ERROR = [""]


def running(cluster: Cluster, name: str) -> bool:
    """Fails at once, with its log, if a node this test started has exited."""
    log = cluster.folder / f"{name}.log"
    assert cluster.nodes[name].poll() is None, f"the {name} node exited: {log.read_text()[-3000:]}"
    return True


def ray_api(cluster: Cluster, path: str, **params: str | int) -> Any:
    """A GET on the head's dashboard (Ray's state API, Serve's REST API), with the cluster's token."""
    answer = httpx.get(
        f"{cluster.dashboard}{path}", params=params, headers={"authorization": f"Bearer {cluster.token}"}, timeout=30
    )
    answer.raise_for_status()
    return answer.json()


def state(cluster: Cluster, kind: str, *, alive: bool = True, **params: str | int) -> list[dict[str, Any]]:
    """Ray's state API: the (live) nodes, actors or placement groups."""
    if alive:
        params = {"filter_keys": "state", "filter_predicates": "=", "filter_values": "ALIVE", **params}
    found: list[dict[str, Any]] = ray_api(cluster, f"/api/v0/{kind}", limit=1000, **params)["data"]["result"]["result"]
    return found


def alive_nodes(cluster: Cluster) -> dict[str, str]:
    """node id -> which node (head or worker), for the nodes Ray reports alive."""
    running(cluster, "head")
    try:
        nodes = state(cluster, "nodes")
    except httpx.HTTPError as exc:  # the dashboard is still starting
        STATE_ERROR[0] = repr(exc)[:500]
        return {}
    return {str(n["node_id"]): "head" if n["is_head_node"] else "worker" for n in nodes}


def diagnosis(cluster: Cluster) -> dict[str, object]:
    """What Ray and Serve say: every node, placement group and Serve replica (for failure messages)."""
    try:
        applications = ray_api(cluster, "/api/serve/applications/")["applications"].values()
        return {
            "nodes": [
                {k: n.get(k) for k in ("node_id", "state", "is_head_node", "resources_total", "state_message")}
                for n in state(cluster, "nodes", alive=False, detail=1)
            ],
            "placement groups": [
                {k: g.get(k) for k in ("name", "state", "bundles")}
                for g in state(cluster, "placement_groups", alive=False, detail=1)
            ],
            "replicas": {
                name: [
                    dep.get("status"),
                    dep.get("message", "")[:300],
                    [(r["state"], r["node_id"]) for r in dep["replicas"]],
                ]
                for app in applications
                for name, dep in app["deployments"].items()
            },
        }
    except (httpx.HTTPError, KeyError) as exc:
        return {"state API": repr(exc)[:500]}


def replica_nodes(cluster: Cluster) -> dict[str, list[str]]:
    """Serve deployment -> the nodes (head, worker) its live replicas run on."""
    nodes = alive_nodes(cluster)
    found: dict[str, list[str]] = {}
    for actor in state(cluster, "actors", detail=1):
        name = str(actor["class_name"])
        if name.startswith("ServeReplica:"):
            found.setdefault(name.rsplit(":", 1)[1], []).append(nodes.get(str(actor["node_id"]), "dead"))
    return found


@pytest.fixture(scope="module")
def cluster(tiny_family: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    folder = tmp_path_factory.mktemp("two-nodes")
    # Ray's socket paths must stay under the kernel's 107 bytes: a short folder of our own.
    temp_dir = Path(tempfile.mkdtemp(prefix="ray2n-", dir="/tmp"))
    cluster = Cluster(folder, temp_dir, {})
    print(f"memory available before the cluster starts: {psutil.virtual_memory().available / 2**30:.1f} GiB")
    try:
        start_node(cluster, "head")
        poll("the head node is up", lambda: "head" in alive_nodes(cluster).values(), 120)
        start_node(cluster, "worker")
        poll(
            "the second node joined",
            lambda: running(cluster, "worker") and sorted(alive_nodes(cluster).values()) == ["head", "worker"],
            120,
        )
        # Both nodes share this machine's address, so only the head runs Serve's HTTP proxy: two proxies
        # would bind the same port. (On a real cluster every node runs one: `serving serve-config`.)
        run(
            [
                *(BIN / "serve", "start", f"--address=127.0.0.1:{GCS_PORT}", "--http-host=127.0.0.1"),
                *(f"--http-port={HTTP_PORT}", "--proxy-location=HeadOnly"),
            ],
            folder / "serve-start.log",
            timeout_s=120,
            env=cluster.env(),
        )
        config = folder / "config.yaml"
        write_config(config, tiny_family)
        pin_variants(config)
        started = time.monotonic()
        run(
            [
                sys.executable,
                "-m",
                "serving.ops.cli",
                "serve",
                "--config",
                str(config),
                "--address",
                f"127.0.0.1:{GCS_PORT}",
            ],
            folder / "serve.log",
            timeout_s=300,
            env=cluster.env(),
        )
        print(f"deployed on two nodes in {time.monotonic() - started:.0f} s")
        yield cluster
    finally:
        # What Ray said last and Ray's logs stay in the test's folder (pytest keeps the last runs' folders),
        # for a failure to be read after the fact; Ray's own temp dir is removed.
        (folder / "diagnosis.json").write_text(json.dumps(diagnosis(cluster), indent=1, default=str))
        for name in ("worker", "head"):
            if name in cluster.nodes:
                stop_node(cluster.nodes[name])
        with contextlib.suppress(OSError):
            shutil.copytree(
                temp_dir / "session_latest" / "logs",
                folder / "ray-logs",
                symlinks=False,
                ignore=shutil.ignore_patterns("*.pid", "events"),
            )
        shutil.rmtree(temp_dir, ignore_errors=True)


def pin_variants(config: Path) -> None:
    """The test's config: Serve's port, and each variant pinned to its node by that node's custom resource."""
    data = yaml.safe_load(config.read_text())
    data["server"]["port"] = HTTP_PORT
    data["router"]["max_replicas_per_node"] = 1  # one router survives the loss of either node
    for variant in ON_HEAD + ON_WORKER:
        data["variants"][variant]["resources"] = {"node_a" if variant in ON_HEAD else "node_b": 1}
    assert set(data["variants"]) == set(ON_HEAD + ON_WORKER), data["variants"]
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    load_config(config)  # still valid, as `serving serve` will read it


def run(command: list[object], log_path: Path, *, timeout_s: float, env: dict[str, str]) -> None:
    with log_path.open("w") as log:
        done = subprocess.run(
            [str(c) for c in command], stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s, env=env
        )
    assert done.returncode == 0, f"{command} exited with {done.returncode}: {log_path.read_text()[-3000:]}"


@pytest.fixture(scope="module")
def cluster_prometheus(cluster: Cluster) -> Iterator[str]:
    """A Prometheus of this cluster's own (the session's `prometheus` scrapes the session's stack)."""
    folder = cluster.folder / "prometheus"
    folder.mkdir()
    # Ray's head writes, and keeps current, the list of every live node's metrics agent in this file.
    discovery = cluster.temp_dir / "prom_metrics_service_discovery.json"
    scrape = f"  - job_name: ray\n    file_sd_configs: [{{files: ['{discovery}'], refresh_interval: 1s}}]\n"
    with run_prometheus(folder, scrape, PROMETHEUS_PORT) as url:
        yield url


def query(url: str, promql: str) -> dict[str, float]:
    """instance (a node's metrics agent) -> value, for a query that keeps the instance label."""
    answer = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=10).json()
    assert answer["status"] == "success", answer
    return {r["metric"].get("instance", ""): float(r["value"][1]) for r in answer["data"]["result"]}


def agent(instances: dict[str, float], node: str) -> bool:
    """Whether a node's metrics agent (Prometheus' instance: the node's address and its metrics port) is there."""
    return any(instance.endswith(f":{NODE_PORTS[node]}") for instance in instances)


# How long after Ray declares a node dead Serve may still hand a call to a replica that was on it.
DROP_S = 10.0


@dataclass
class Outcome:
    key: str
    started: float
    seconds: float
    status: int  # 200, the HTTP status of an error, or 0: no answer within CALL_TIMEOUT_S or no connection
    variant: str = ""
    error: dict[str, Any] = field(default_factory=dict)


def shaped(outcome: Outcome) -> bool:
    """Whether the error body is OpenAI's: {"error": {"message": ..., "type": ..., ...}}."""
    error = outcome.error.get("error")
    return isinstance(error, dict) and bool(error.get("message"))


class Traffic:
    """One client per key, one request after another, every call bounded by CALL_TIMEOUT_S."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        self.outcomes: list[Outcome] = []
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self.loop, args=(key,), daemon=True) for key in keys]

    def __enter__(self) -> Traffic:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=CALL_TIMEOUT_S + 10)

    def loop(self, key: str) -> None:
        api = openai.OpenAI(base_url=f"{BASE}/v1", api_key=key, max_retries=0, timeout=CALL_TIMEOUT_S)
        i = 0
        while not self.stopping.is_set():
            i += 1
            started = time.monotonic()
            outcome = Outcome(key, started, 0.0, 0)
            try:
                answer = api.chat.completions.with_raw_response.create(
                    model="demo-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=4, user=f"u{i % 8}"
                )
                outcome.status, outcome.variant = 200, answer.headers["x-served-variant"]
            except openai.APIStatusError as exc:
                outcome.status = exc.status_code
                try:
                    outcome.error = exc.response.json()
                except ValueError:
                    outcome.error = {"not json": exc.response.text[:200]}
            except openai.APIConnectionError as exc:  # includes APITimeoutError
                outcome.error = {"no answer": repr(exc)}
            outcome.seconds = time.monotonic() - started
            self.outcomes.append(outcome)
            if outcome.status != 200:
                time.sleep(0.5)  # as a client would back off; the test never waits on this

    def summary(self, moment: float = 0.0) -> dict[str, int]:
        """(key, status) -> count, with a few error bodies, for failure messages."""
        found: dict[str, int] = {}
        for o in list(self.outcomes):
            if o.started >= moment:
                name = f"{o.key} {o.status} {json.dumps(o.error)[:160] if o.error else o.variant}"
                found[name] = found.get(name, 0) + 1
        return found

    def since(self, moment: float, key: str) -> list[Outcome]:
        return [o for o in list(self.outcomes) if o.key == key and o.started >= moment]


def test_variants_are_split_over_the_nodes_and_both_nodes_metrics_reach_prometheus(
    cluster: Cluster, cluster_prometheus: str
) -> None:
    url = cluster_prometheus
    placed = replica_nodes(cluster)
    print(f"replicas per node: {placed}")
    assert placed["variant-fp16"] == ["head"]
    assert placed["variant-int8"] == placed["variant-awq"] == ["worker"]
    assert sorted(placed["Router"]) == ["head", "worker"], "max_replicas_per_node: 1 spreads the routers"
    with Traffic(("demo-premium", "demo-batch")) as traffic:
        poll(
            "both tiers answered",
            lambda: all(sum(o.status == 200 for o in traffic.since(0, k)) >= 3 for k in ("demo-premium", "demo-batch")),
            120,
        )
    # Both nodes' agents are discovered and scraped, and each exports the replicas that run on it.
    up = 'up{job="ray"} == 1'
    poll(
        "both agents are up",
        lambda: agent(query(url, up), "head") and agent(query(url, up), "worker"),
        60,
        seen=lambda: query(url, "up"),
    )
    served = 'sum by (instance) (ray_serve_deployment_request_counter_total{deployment=~".*variant-%s"})'
    poll("fp16's requests counted on the head", lambda: agent(query(url, served % "fp16"), "head"), 60)
    poll("int8's requests counted on the worker", lambda: agent(query(url, served % "int8"), "worker"), 60)
    print(f"the cluster's memory: {memory_gib(cluster):.1f} GiB")
    routers = query(url, "sum by (instance) (ray_serving_requests_total)")
    print(f"router requests per node agent: {routers}")
    assert routers, "no router metrics reached Prometheus"


def test_losing_the_second_node_gives_clear_errors_and_it_comes_back(cluster: Cluster, cluster_prometheus: str) -> None:
    url = cluster_prometheus
    worker = cluster.nodes["worker"]
    with Traffic(("demo-premium", "demo-batch")) as traffic:
        poll("traffic flows", lambda: len(traffic.since(0, "demo-batch")) >= 2, 60)
        raylet = next(p for p in node_processes(worker) if p.name() == "raylet")
        processes = node_processes(worker)
        lost = time.monotonic()
        raylet.kill()
        # `ray start --block` stops the node's other processes when its raylet dies; any that outlive it
        # would hold the node's ports.
        worker.wait(timeout=60)
        psutil.wait_procs([p for p in processes if p.is_running()], timeout=30)
        for p in processes:
            with_gone(p.kill)
        poll("Ray reports the node dead", lambda: "worker" not in alive_nodes(cluster).values(), 60)
        dead = time.monotonic()
        print(f"[{dead - lost:.0f} s after the kill] Ray reports the node dead")
        poll(
            "the second node's variants answer 503 while it is gone, the head's variant 200",
            lambda: (
                any(o.status != 200 for o in traffic.since(dead, "demo-batch"))
                and sum(o.status == 200 for o in traffic.since(dead, "demo-premium")) >= 3
            ),
            60,
            seen=lambda: traffic.summary(lost),
        )
        print(f"[{time.monotonic() - lost:.0f} s after the kill] restarting the node: {traffic.summary(lost)}")
        back = time.monotonic()
        start_node(cluster, "worker")
        # Observed: ~3 s for the node to join, ~30 s for its replicas' processes to start, ~40 s for the engines.
        poll(
            "the second node's variants serve again",
            lambda: running(cluster, "worker") and any(o.status == 200 for o in traffic.since(back, "demo-batch")),
            180,
            seen=lambda: (traffic.summary(back), diagnosis(cluster)),
        )
        returned = time.monotonic()
        print(f"[{returned - back:.0f} s after the restart] serving again")
        poll(
            "both of its variants",
            lambda: {o.variant for o in traffic.since(returned, "demo-batch") if o.status == 200} == set(ON_WORKER),
            60,
        )
    outcomes = traffic.outcomes
    summary = {(o.key, o.status): sum(1 for x in outcomes if (x.key, x.status) == (o.key, o.status)) for o in outcomes}
    print(f"outcomes (key, status) -> count: {summary}; slowest call {max(o.seconds for o in outcomes):.1f} s")
    hangs = [o for o in outcomes if o.status == 0]
    assert not hangs, f"calls without an answer within {CALL_TIMEOUT_S} s: {hangs[:3]}"
    failures = [o for o in outcomes if o.status != 200]
    # A router replica on the lost node dies with the calls it holds, and Serve's proxy answers those itself
    # with a plain-text 500 (which the openai client retries by default). Only calls the proxy could still hand
    # to that replica (until Serve drops it, seconds after Ray declares the node dead) may fail that way.
    router_lost = [o for o in failures if o.status == 500 and lost - CALL_TIMEOUT_S <= o.started <= dead + DROP_S]
    print(f"calls lost with a router replica: {len(router_lost)}")
    unclear = [o for o in failures if o not in router_lost and not (o.status == 503 and shaped(o))]
    assert not unclear, f"every other error is an OpenAI-shaped 503 ({{error: {{message, ...}}}}): {unclear[:3]}"
    assert replica_nodes(cluster)["variant-int8"] == ["worker"]
    # The returned node's agent is discovered again and exports its replicas' metrics.
    served = 'sum by (instance) (ray_serve_deployment_request_counter_total{deployment=~".*variant-awq"})'
    poll("awq's requests counted on the returned node", lambda: agent(query(url, served), "worker"), 60)
    print(json.dumps(replica_nodes(cluster)))
