"""Ordinary traffic for a running stack, as the demo's users would send it: the evaluation set's prompts,
from many users, on the given keys, until the time is up; then the rollout status.

    .venv/bin/python loadtests/traffic.py [--keys demo-standard,demo-batch] [--minutes 10] [--concurrency 2]

Each request picks a prompt and a user at random (users are sticky to a variant, so many users are needed
for a canary to see traffic), asks greedily for at most `--max-tokens`, and counts which variant answered.
Use it to watch the rollout do its work: `serving rollout status` in another terminal.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import openai

from serving.evals import load_eval_set

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--keys", default="demo-standard,demo-batch", help="comma-separated API keys")
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--users", type=int, default=1000)
    args = parser.parse_args()
    prompts = [item.prompt for item in load_eval_set()]
    clients = [
        openai.OpenAI(base_url=args.base, api_key=key, max_retries=0, timeout=120) for key in args.keys.split(",")
    ]
    served: Counter[tuple[str, str]] = Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + args.minutes * 60

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            index = rng.randrange(len(clients))
            try:
                reply = clients[index].chat.completions.with_raw_response.create(
                    model="demo-chat",
                    messages=[{"role": "user", "content": rng.choice(prompts)}],
                    max_tokens=args.max_tokens,
                    temperature=0,
                    user=f"user-{rng.randrange(args.users)}",
                )
                outcome = reply.headers.get("x-served-variant", "?")
            except openai.APIError as exc:
                outcome = f"error {getattr(exc, 'status_code', '')}".strip()
            with lock:
                served[(args.keys.split(",")[index], outcome)] += 1

    threads = [threading.Thread(target=worker, args=(seed,), daemon=True) for seed in range(args.concurrency)]
    for thread in threads:
        thread.start()
    while any(t.is_alive() for t in threads):
        time.sleep(30)
        with lock:
            print(
                f"[{time.strftime('%H:%M:%S')}] " + ", ".join(f"{k}->{v}: {n}" for (k, v), n in sorted(served.items()))
            )
    subprocess.run([sys.executable, "-m", "serving.ops.cli", "rollout", "status"], cwd=REPO, check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
