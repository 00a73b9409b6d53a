"""Time from `make serve` to the first answer, measured the way a user meets it, several times.

    .venv/bin/python loadtests/startup.py [--runs 3] [--command "make serve"] [--out results/startup.json]

Each run starts the command (by default `make serve`, which checks the install and the models first;
build them once beforehand with `make models`), asks for a one-token chat completion every half second
until one is answered, then presses Ctrl-C (SIGINT to the command's process group, as a terminal does)
and waits for everything to exit. Every line the stack prints is kept with its second since start, so
the progress lines show where the time went. The results are written as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
CHAT = {"model": "demo-chat", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 1}


def read_lines(stream: Any, into: queue.Queue[tuple[float, str]], started: float) -> None:
    for line in iter(stream.readline, ""):
        into.put((time.monotonic() - started, line.rstrip()))


def one_run(command: list[str], base: str, key: str, timeout_s: float) -> dict[str, Any]:
    started = time.monotonic()
    process = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    lines: queue.Queue[tuple[float, str]] = queue.Queue()
    threading.Thread(target=read_lines, args=(process.stdout, lines, started), daemon=True).start()
    first_answer_s = None
    try:
        while time.monotonic() - started < timeout_s and process.poll() is None:
            try:
                answer = httpx.post(
                    f"{base}/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {key}"}, timeout=60
                )
                if answer.status_code == 200:
                    first_answer_s = time.monotonic() - started
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
    finally:
        stop_at = time.monotonic()
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        stopped_s = time.monotonic() - stop_at
    output = []
    while not lines.empty():
        output.append(lines.get())
    return {
        "first_answer_s": None if first_answer_s is None else round(first_answer_s, 1),
        "stop_s": round(stopped_s, 1),
        "exit_code": process.returncode,
        "output": [f"{at:6.1f} s  {line}" for at, line in output],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--command", default="make serve", help="what starts the stack (default: %(default)s)")
    parser.add_argument("--base", default="http://127.0.0.1:8000")
    parser.add_argument("--key", default="demo-premium")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--label", default="current", help="a name for this series in the results file")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "startup.json")
    args = parser.parse_args()
    command = shlex.split(args.command)
    runs = []
    for index in range(args.runs):
        run = one_run(command, args.base, args.key, args.timeout)
        runs.append(run)
        first, stop = run["first_answer_s"], run["stop_s"]
        print(f"run {index + 1}/{args.runs}: first answer after {first} s, stopped in {stop} s")
        for line in run["output"]:
            print("   ", line)
    times = [r["first_answer_s"] for r in runs if r["first_answer_s"] is not None]
    found = json.loads(args.out.read_text()) if args.out.is_file() else {}
    found[args.label] = {
        "machine": {"cpus": os.cpu_count()},
        "first_answer_s": times,
        "median_s": statistics.median(times) if times else None,
        "failed_runs": args.runs - len(times),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(found, indent=2))
    print(f"{args.label}: first answer after {times} s (median {found[args.label]['median_s']}); wrote {args.out}")
    return 0 if len(times) == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
