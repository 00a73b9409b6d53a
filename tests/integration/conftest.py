"""The real stack for the integration tests: `serving serve` (Ray Serve, the router, three vLLM CPU
engines) on the freshly built demo family, started once per test session on test ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from serving.config import hash_key

REPO = Path(__file__).resolve().parents[2]
PORT = 18_321
METRICS_PORT = 18_322
BASE = f"http://127.0.0.1:{PORT}"
METRICS_URL = f"http://127.0.0.1:{METRICS_PORT}/metrics"


@dataclass(frozen=True)
class Stack:
    config: Path
    family: Path


def write_config(path: Path, family: Path, *, standard_weight: float = 50.0, shadow_rate: float = 0.2) -> None:
    """The demo config (deploy/demo.yaml) pointed at the test's family and ports, with the given
    standard-tier weight and shadow rate, plus one premium key that may override."""
    text = (REPO / "deploy" / "demo.yaml").read_text()
    text = text.replace("../models/demo", str(family)).replace("port: 8000", f"port: {PORT}")
    text = text.replace("weight: 50.0                                    #", f"weight: {standard_weight} #", 1)
    text = text.replace("rate: 0.2}", f"rate: {shadow_rate}}}")
    premium_admin = f"  - {{sha256: {hash_key('test-premium-admin')}, tenant: t, tier: premium, may_override: true}}\n"
    text = text.replace("\nlimits:", f"\n{premium_admin}\nlimits:")
    text += f"\nobservability: {{metrics_port: {METRICS_PORT}}}\n"
    path.write_text(text)


def apply_config(stack: Stack, **settings: float) -> subprocess.CompletedProcess[str]:
    """Edits the config file and applies it with the documented command; waits until routers follow."""
    write_config(stack.config, stack.family, **settings)
    done = subprocess.run(
        [sys.executable, "-m", "serving.cli", "apply", str(stack.config)], capture_output=True, text=True, check=False
    )
    time.sleep(2.5)  # routers poll the config store every second
    return done


@pytest.fixture(scope="session")
def stack(demo_family: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    config = tmp_path_factory.mktemp("stack") / "config.yaml"
    write_config(config, demo_family)
    log_path = config.parent / "serve.log"
    log = log_path.open("w")
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "serving.cli", "serve", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"serving serve exited with {process.returncode}: {log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{BASE}/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        else:
            pytest.fail("the stack was not ready within 10 minutes")
        print(f"stack ready in {time.monotonic() - started:.0f} s")
        yield Stack(config, demo_family)
    finally:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()
