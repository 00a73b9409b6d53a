"""The real stack for the integration tests: `serving serve` (Ray Serve, two router replicas, three vLLM
CPU engines) on the freshly built demo family, started once per test session on test ports. Two router
replicas, because nothing in a replica may assume it is the only one (metrics, feedback, signals)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from serving.config import Config, EscalationConfig, KeyConfig, ProgressionConfig, hash_key, load_config
from tests.polling import poll_until

REPO = Path(__file__).resolve().parents[2]
PORT = 18_321
METRICS_PORT = 18_322  # the node's Ray metrics agent: every replica's metrics, the router's and the engines'
BASE = f"http://127.0.0.1:{PORT}"
METRICS_URL = f"http://127.0.0.1:{METRICS_PORT}/metrics"
PROMETHEUS_PORT = 18_390
ROUTER_REPLICAS = 2


@dataclass(frozen=True)
class Stack:
    config: Path
    family: Path
    log: Path  # what `serving serve` printed: the console a person reads
    process: subprocess.Popen[bytes]  # `serving serve`; only a test marked `stops_stack` signals it


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that stop the session's stack run after every other test (a stable sort keeps the rest in order)."""
    items.sort(key=lambda item: item.get_closest_marker("stops_stack") is not None)


def write_config(
    path: Path,
    family: Path,
    *,
    standard_weight: float = 50.0,
    batch_weight: float = 50.0,
    shadow_rate: float = 0.2,
    rollback: bool = False,
    standard_escalation: float | None = None,
    batch_progression: ProgressionConfig | None = None,
) -> None:
    """The tiny demo config (deploy/tiny.yaml), changed through the config model: pointed at the test's family,
    ports and state file, with the given weights, shadow rate (both shadowed tiers), rollback switch and the
    standard tier's escalation threshold (None: no escalation), the batch tier's progression (None: none), plus
    one premium key that may override, and ROUTER_REPLICAS router replicas. Automatic rollback is off unless a
    test turns it on: the other tests need the awq candidate to keep serving. The defaults are the stack's
    starting config: a test that applies other settings applies `write_config`'s defaults again when done."""
    demo = load_config(REPO / "deploy" / "tiny.yaml")
    variants = {
        name: v.model_copy(update={"path": family / v.path.name}) if v.path is not None else v
        for name, v in demo.variants.items()
    }
    weights = {"standard": standard_weight, "batch": batch_weight}
    tiers = {}
    for name, tier in demo.tiers.items():
        changes: dict[str, object] = {}
        if name in weights:
            changes["weight"] = weights[name]
        if tier.shadow is not None:
            changes["shadow"] = tier.shadow.model_copy(update={"rate": shadow_rate})
        if name == "standard" and standard_escalation is not None:
            changes["escalation"] = EscalationConfig(min_mean_logprob=standard_escalation)
        if name == "batch" and batch_progression is not None:
            changes["progression"] = batch_progression
        tiers[name] = tier.model_copy(update=changes)
    premium_admin = KeyConfig(sha256=hash_key("test-premium-admin"), tenant="t", tier="premium", may_override=True)
    config = demo.model_copy(
        update={
            "variants": variants,
            "tiers": tiers,
            "keys": (*demo.keys, premium_admin),
            "server": demo.server.model_copy(update={"port": PORT}),
            "observability": demo.observability.model_copy(update={"metrics_port": METRICS_PORT}),
            "rollback": demo.rollback.model_copy(
                update={"enabled": rollback, "state_file": path.parent / "rollout-state.json"}
            ),
            "router": demo.router.model_copy(update={"replicas": ROUTER_REPLICAS}),
        }
    )
    # Validated again as `serving apply` will read it (model_copy does not validate), then written.
    Config.model_validate(config.model_dump())
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_none=True), sort_keys=False))


def apply_config(stack: Stack, **settings: object) -> subprocess.CompletedProcess[str]:
    """Writes the config file with these settings (`write_config`'s defaults for the rest), applies it with the
    documented command, and waits until the router runs it."""
    write_config(stack.config, stack.family, **settings)  # type: ignore[arg-type]
    done = subprocess.run(
        [sys.executable, "-m", "serving.ops.cli", "apply", str(stack.config)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode == 0:
        version = int(done.stdout.split("config version ")[1].split(";")[0])
        poll_until(
            lambda: httpx.get(f"{BASE}/health", timeout=5).json()["config_version"] >= version,
            f"the router to run config version {version}",
            interval_s=0.2,
        )
    return done


Configure = Callable[..., None]


@pytest.fixture
def configure(stack: Stack) -> Iterator[Configure]:
    """Applies settings to the session's stack for one test (`apply_config`'s keywords), and after the test,
    whatever its outcome, the stack's starting config again: no test sees settings another test left."""
    changed = False

    def apply(**settings: float | bool | None) -> None:
        nonlocal changed
        changed = True
        done = apply_config(stack, **settings)
        assert done.returncode == 0, done.stderr

    yield apply
    if changed:
        restored = apply_config(stack)
        assert restored.returncode == 0, restored.stderr


def wait_for_http(url: str, process: subprocess.Popen[bytes], log_path: Path, timeout_s: float) -> None:
    """Waits until `url` answers 200, failing early (with the log's tail) if the process exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{process.args!r} exited with {process.returncode}: {log_path.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    pytest.fail(f"{url} did not answer within {timeout_s} s: {log_path.read_text()[-3000:]}")


def served_variants(key: str, users: range, prefix: str = "user") -> set[str]:
    """The variants that answered one request from each of these users."""
    api = openai.OpenAI(base_url=f"{BASE}/v1", api_key=key, max_retries=2, timeout=120)
    return {
        api.chat.completions.with_raw_response.create(
            model="demo-chat", messages=[{"role": "user", "content": "x"}], max_tokens=1, user=f"{prefix}-{i}"
        ).headers["x-served-variant"]
        for i in users
    }


@pytest.fixture(scope="session")
def stack(tiny_family: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    config = tmp_path_factory.mktemp("stack") / "config.yaml"
    write_config(config, tiny_family)
    log_path = config.parent / "serve.log"
    log = log_path.open("w")
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "serving.ops.cli", "serve", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for_http(f"{BASE}/ready", process, log_path, timeout_s=600)
        print(f"stack ready in {time.monotonic() - started:.0f} s")
        yield Stack(config, tiny_family, log_path, process)
    finally:
        with contextlib.suppress(ProcessLookupError):  # a `stops_stack` test may have stopped it already
            os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()


@contextlib.contextmanager
def run_prometheus(folder: Path, scrape_configs: str, port: int) -> Iterator[str]:
    """A real Prometheus server (Debian's package) evaluating every second, with `scrape_configs` (YAML list
    items), its data and log in `folder`, listening on 127.0.0.1:`port`; yields its URL."""
    binary = shutil.which("prometheus")
    assert binary, "prometheus is not installed; `make test` installs it (scripts/install-test-tools.sh)"
    config = folder / "prometheus.yml"
    config.write_text(f"global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nscrape_configs:\n{scrape_configs}")
    log_path = folder / "prometheus.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/-/ready", process, log_path, timeout_s=60)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="session")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Prometheus scraping the stack's metrics agent every second, for the whole session: the contract test
    and the every-panel test read the same one."""
    scrape = f"  - job_name: serving\n    static_configs: [{{targets: ['127.0.0.1:{METRICS_PORT}']}}]\n"
    with run_prometheus(tmp_path_factory.mktemp("prometheus"), scrape, PROMETHEUS_PORT) as url:
        yield url


@pytest.fixture(scope="module")
def ray_driver() -> Iterator[None]:
    """This process attached to the stack's Ray cluster as a driver, for the tests that act through Ray's API."""
    import ray

    from serving.rollout.controller import NAMESPACE

    ray.init(address="auto", namespace=NAMESPACE, log_to_driver=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


def exported(name: str, **labels: str) -> float:
    """The sum of a metric's samples on this node's Ray metrics agent, over every process that reports."""
    want = set(labels.items())
    return sum(
        sample.value
        for family in text_string_to_metric_families(httpx.get(METRICS_URL, timeout=10).text)
        for sample in family.samples
        if sample.name == name and want <= set(sample.labels.items())
    )
