"""A candidate that cannot run right on this machine never takes the service down: `serving serve` on a stack
whose candidate's weights answer garbage (the tiny fp16 model with its embedding rows shuffled: it loads and
generates, on every CPU, words unrelated to fp16's) starts, serves every tier from its baseline, and says which
variant is out and why: on the console once, in `/ready`, `/v1/models` and the rollout status, in a 503
`variant_unfit` to an override, and in the machine-local verification record with the answers side by side.

It needs the machine to itself (a second Ray and two more engines), so it stops the session's stack first and
runs last (tests/integration/conftest.py moves `stops_stack` tests to the end).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from serving.config import Config, TierConfig, load_config
from serving.engine import verify
from serving.engine.verify import RECORD_DIR_ENV
from serving.models.broken import garble
from tests.integration.conftest import REPO, Stack, wait_for_http

pytestmark = [pytest.mark.integration, pytest.mark.stops_stack]

PORT = 18_421
METRICS_PORT = 18_422
BASE = f"http://127.0.0.1:{PORT}"


def write_config(path: Path, fp16: Path, garbled: Path) -> None:
    """Two engines: fp16, every tier's baseline, and `garbled`, the standard tier's only candidate at 100 %."""
    demo = load_config(REPO / "deploy" / "tiny.yaml")
    variants = {
        "fp16": demo.variants["fp16"].model_copy(update={"path": fp16}),
        # The default floor (deploy/tiny.yaml sets 0 for its own quantized variants: their agreement is noise).
        "garbled": demo.variants["int8"].model_copy(update={"path": garbled, "min_agreement": verify.MIN_AGREEMENT}),
    }
    tiers = {
        "premium": TierConfig(baseline="fp16"),
        "standard": TierConfig(baseline="fp16", candidate="garbled", weight=100.0),
        "batch": TierConfig(baseline="fp16"),
    }
    config = demo.model_copy(
        update={
            "variants": variants,
            "tiers": tiers,
            "server": demo.server.model_copy(update={"port": PORT}),
            "observability": demo.observability.model_copy(update={"metrics_port": METRICS_PORT}),
            "rollback": demo.rollback.model_copy(update={"state_file": path.parent / "state.json"}),
            "router": demo.router.model_copy(update={"replicas": 1}),
        }
    )
    Config.model_validate(config.model_dump())
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_none=True), sort_keys=False))


@contextlib.contextmanager
def serving(config: Path, env: dict[str, str]) -> Iterator[Path]:
    log_path = config.parent / "serve.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "serving.ops.cli", "serve", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
        try:
            wait_for_http(f"{BASE}/ready", process, log_path, timeout_s=600)
            yield log_path
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def stop_session_stack(stack: Stack) -> None:
    if stack.process.poll() is None:
        os.killpg(stack.process.pid, signal.SIGINT)
        stack.process.wait(timeout=180)


def test_a_candidate_unfit_here_is_out_with_its_reason_and_every_tier_is_served(
    stack: Stack, tiny_family: Path, tmp_path: Path
) -> None:
    stop_session_stack(stack)
    garbled = garble(tiny_family / "fp16", tmp_path / "garbled")
    config = tmp_path / "config.yaml"
    write_config(config, tiny_family / "fp16", garbled)
    records = tmp_path / "verification"
    with serving(config, {**os.environ, RECORD_DIR_ENV: str(records)}) as log_path:
        console = log_path.read_text()
        print(console)
        (out_line,) = [line for line in console.splitlines() if "engine garbled" in line]
        assert "OUT: unfit on this machine: agreement" in out_line
        assert "out of the rollout, its tiers are served by their baselines" in out_line
        assert "engine fp16   ready" in console
        assert "Traceback" not in console

        ready = httpx.get(f"{BASE}/ready", timeout=30).json()
        reason = ready["unfit"]["garbled"]
        assert reason.startswith("unfit on this machine: agreement")
        assert "below the floor" in reason
        assert ready["variants"] == {"fp16": True}

        # The standard tier's weight is 100 % on the candidate, and every user gets the baseline.
        api = openai.OpenAI(base_url=f"{BASE}/v1", api_key="demo-standard", max_retries=0, timeout=120)
        served = {
            api.chat.completions.with_raw_response.create(
                model="demo-chat", messages=[{"role": "user", "content": "x"}], max_tokens=4, user=f"u{i}"
            ).headers["x-served-variant"]
            for i in range(12)
        }
        assert served == {"fp16"}
        for key in ("demo-premium", "demo-batch"):
            answer = httpx.post(
                f"{BASE}/v1/chat/completions",
                headers={"authorization": f"Bearer {key}"},
                json={"model": "demo-chat", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4},
                timeout=120,
            )
            assert answer.status_code == 200

        admin = {"authorization": "Bearer demo-admin"}
        pinned = httpx.post(
            f"{BASE}/v1/chat/completions",
            headers={**admin, "x-variant": "garbled"},
            json={"model": "demo-chat", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4},
            timeout=60,
        )
        assert pinned.status_code == 503
        assert pinned.json()["error"]["code"] == "variant_unfit"
        assert pinned.json()["error"]["message"] == f"variant garbled is {reason}"

        models = httpx.get(f"{BASE}/v1/models", headers=admin, timeout=60).json()["data"][0]["variants"]
        assert models["garbled"]["unfit"] == reason
        assert not models["garbled"]["verification"]["fit"]
        assert [a["dtype"] for a in models["garbled"]["verification"]["attempts"]] == ["float16", "bfloat16"]
        assert models["fp16"]["verification"]["fit"]

        status = httpx.get(f"{BASE}/admin/rollout", headers=admin, timeout=30).json()
        tier = status["tiers"]["standard"]
        assert tier["unfit"] == reason
        assert tier["live_weight"] == 0.0

    (record_file,) = [p for p in records.glob("garbled-*.json")]
    (entry,) = json.loads(record_file.read_text())["machines"].values()
    assert set(entry["machine"]) == {"cpu", "cpu_flags", "gpu", "vllm", "torch"}
    verdict = entry["verdict"]
    assert not verdict["fit"]
    assert verdict["reference"] == "fp16"
    assert len(verdict["answers"]) == len(verdict["reference_answers"]) == 6
    assert verdict["answers"][0]["text"] != verdict["reference_answers"][0]["text"]
    print("record:", json.dumps(entry, indent=2)[:3000])
