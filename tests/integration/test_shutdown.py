"""Stopping the stack as an operator does (SIGTERM to `serving serve`, as `kill` and Kubernetes send it) while
answers stream: every stream in flight ends whole, every request sent after the signal is refused cleanly (a 503
`shutting_down` with Retry-After while the stack drains, then a refused connection, or a closed one as Serve kills
its proxy: never a hang, never a 500), `/ready` says 503 while draining, and the process exits 0 within the drain
bound. The streams must still run when the first refusal comes, or the test did not try what it names.

It stops the session's `stack`, so it runs last (tests/integration/conftest.py moves every test marked
`stops_stack` to the end of the session). With SERVING_RELIABILITY_TABLE set, its row goes to RELIABILITY.md.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import openai
import pytest

from serving.config import load_config
from tests.integration.conftest import BASE, Stack
from tests.integration.test_reliability import record
from tests.polling import poll_until

pytestmark = [pytest.mark.integration, pytest.mark.stops_stack]

STREAMS = 6
MAX_TOKENS = 512
CHOICES = 4  # per stream: the tiny engines write 512 tokens in about 2 s; four choices keep a stream going longer
KEYS = ("demo-premium", "demo-standard", "demo-batch")  # fp16, int8 or fp16, int8 or awq
NEW_REQUEST_TIMEOUT_S = 30.0  # a refusal is fast; one this slow is a hang
# What Serve's own stopping (replicas, proxy, controller) and Ray's may take after the drain, on 2 shared cores.
STOP_MARGIN_S = 90.0


@dataclass
class Stream:
    key: str
    chunks: int = 0
    tokens: int | None = None  # completion tokens in the closing usage chunk
    error: str | None = None
    ended_at: float | None = None

    def whole(self) -> bool:
        return self.error is None and self.tokens == CHOICES * MAX_TOKENS


@dataclass
class Probe:
    """One request sent after the signal: what came back, how long after the signal, and how long it took."""

    after_s: float
    took_s: float
    outcome: str  # "200", "503 shutting_down", "connection refused", ...
    retry_after: str | None = None


@dataclass
class Probes:
    asked: list[Probe] = field(default_factory=list)
    ready: list[str] = field(default_factory=list)  # what /ready answered, in order


def stream(item: Stream) -> None:
    api = openai.OpenAI(base_url=f"{BASE}/v1", api_key=item.key, max_retries=0, timeout=120)
    try:
        for chunk in api.chat.completions.create(
            model="demo-chat",
            messages=[{"role": "user", "content": "Tell me a long story"}],
            max_tokens=MAX_TOKENS,
            n=CHOICES,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        ):
            if chunk.usage is not None:
                item.tokens = chunk.usage.completion_tokens
            elif chunk.choices:
                item.chunks += 1
    except Exception as exc:  # what a client sees when its answer is cut: recorded, judged below
        item.error = f"{type(exc).__name__}: {exc}"
    finally:
        item.ended_at = time.monotonic()


def outcome_of(response: httpx.Response) -> str:
    if response.status_code == 200:
        return "200"
    try:
        code = response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return f"{response.status_code} {response.text[:60]!r}"
    return f"{response.status_code} {code}"


def probe(client: httpx.Client, signalled: float, exited: threading.Event, probes: Probes) -> None:
    """Sends a short request and asks /ready every 0.25 s from the signal until the process has exited."""
    body = {"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    headers = {"authorization": "Bearer demo-premium"}
    while not exited.is_set():
        sent = time.monotonic()
        try:
            response = client.post(f"{BASE}/v1/chat/completions", json=body, headers=headers)
            outcome, retry_after = outcome_of(response), response.headers.get("retry-after")
        except httpx.ConnectError:
            outcome, retry_after = "connection refused", None
        except (httpx.ReadError, httpx.RemoteProtocolError):  # a connection the stopping proxy took, then closed
            outcome, retry_after = "connection closed", None
        except httpx.HTTPError as exc:
            outcome, retry_after = type(exc).__name__, None
        probes.asked.append(Probe(sent - signalled, time.monotonic() - sent, outcome, retry_after))
        try:
            probes.ready.append(str(client.get(f"{BASE}/ready", timeout=5).status_code))
        except httpx.HTTPError as exc:
            probes.ready.append(type(exc).__name__)
        exited.wait(0.25)


def test_sigterm_drains_streams_in_flight_and_refuses_new_requests_cleanly(stack: Stack) -> None:
    bound_s = load_config(stack.config).router.graceful_shutdown_timeout_s
    streams = [Stream(KEYS[i % len(KEYS)]) for i in range(STREAMS)]
    threads = [threading.Thread(target=stream, args=(s,), daemon=True) for s in streams]
    for thread in threads:
        thread.start()
    # Every stream under way (its first tokens read) and none near its end: the signal lands mid-answer.
    poll_until(
        lambda: all(s.chunks >= 1 for s in streams), "every stream's first tokens", timeout_s=120, interval_s=0.05
    )
    assert all(s.ended_at is None for s in streams), [s.error for s in streams]

    # The prober's client is made and connected before the signal, so its first probe goes out at once (made in its
    # thread after the signal, on 2 busy cores, the first probe of one run came 3.7 s into a 5 s drain).
    client = httpx.Client(timeout=NEW_REQUEST_TIMEOUT_S)
    assert client.get(f"{BASE}/health").status_code == 200
    exited = threading.Event()
    probes = Probes()
    signalled = time.monotonic()
    os.kill(stack.process.pid, signal.SIGTERM)
    prober = threading.Thread(target=probe, args=(client, signalled, exited, probes), daemon=True)
    prober.start()
    try:
        code = stack.process.wait(timeout=bound_s + STOP_MARGIN_S)
    finally:
        exited.set()
    stopped_s = time.monotonic() - signalled
    prober.join(timeout=NEW_REQUEST_TIMEOUT_S + 10)
    client.close()
    for thread in threads:
        thread.join(timeout=10)

    whole = [s for s in streams if s.whole()]
    ended = [s.ended_at - signalled for s in streams if s.ended_at is not None]
    outcomes = Counter(p.outcome for p in probes.asked)
    summary = {
        "exit_code": code,
        "stopped_s": round(stopped_s, 1),
        "bound_s": bound_s,
        "streams_whole": len(whole),
        "streams": [(s.key, s.chunks, s.tokens, s.error) for s in streams],
        "streams_ended_s": sorted(round(t, 1) for t in ended),
        "new_requests": dict(outcomes),
        "slowest_new_request_s": round(max((p.took_s for p in probes.asked), default=0), 2),
        "ready": dict(Counter(probes.ready)),
        "first_503_s": next((round(p.after_s, 2) for p in probes.asked if "shutting_down" in p.outcome), None),
        "log_tail": stack.log.read_text()[-600:],
    }
    print(json.dumps(summary, indent=1))
    statuses: list[int | str] = [200 if s.whole() else f"cut ({s.error})" for s in streams]
    record(
        f"{STREAMS} streams of {CHOICES} x {MAX_TOKENS} tokens in flight across a SIGTERM to `serving serve`", statuses
    )
    record("new requests sent after the SIGTERM, every 0.25 s until the process exited", list(outcomes.elements()))

    assert len(whole) == STREAMS, f"streams cut by the shutdown: {summary['streams']}"
    first_refusal = next((p.after_s for p in probes.asked if p.outcome == "503 shutting_down"), None)
    assert first_refusal is not None, f"no request was refused while the stack drained: {dict(outcomes)}"
    across = [t for t in ended if t > first_refusal]
    assert len(across) >= STREAMS // 2, f"streams ended before the routers drained (at {first_refusal:.1f} s): {ended}"
    assert code == 0, summary["log_tail"]
    assert stopped_s < bound_s + STOP_MARGIN_S
    # A 200: sent before the routers heard. A connection closed without an answer: only once the drain was over and
    # Serve stopping (its proxy is killed), never while a stream ran.
    allowed = {"200", "503 shutting_down", "connection refused"}
    last_stream_s = max(ended)
    refused_badly = [
        p
        for p in probes.asked
        if p.outcome not in allowed and not (p.outcome == "connection closed" and p.after_s > last_stream_s)
    ]
    assert not refused_badly, f"new requests not refused cleanly: {refused_badly}"
    assert max(p.took_s for p in probes.asked) < NEW_REQUEST_TIMEOUT_S / 2, "a new request hung"
    assert all(p.retry_after for p in probes.asked if p.outcome == "503 shutting_down")
    assert "503" in probes.ready, f"/ready never said 503 while draining: {probes.ready}"
