"""Sampling profiles of the stack's processes under load, with py-spy (from PyPI, in the serving environment).

For each named process: a flame graph (`NAME.svg`) and the same samples as collapsed stacks (`NAME.txt`),
from which `top_frames` says where the time goes. Profiles are taken in a pass of their own, never during
a measured run: sampling costs the processes some CPU.
"""

from __future__ import annotations

import collections
import subprocess
import sys
from pathlib import Path

PY_SPY = str(Path(sys.executable).parent / "py-spy")
RATE_HZ = 50

# The stack's processes, by the title Ray gives them (`ray::<actor>`).
STACK_PROCESSES = {
    "router": "ServeReplica:serving:Router",
    "proxy": "ray::ProxyActor",
    "engine-replica": "VariantServer:variant-fp16",
}


def pid_of(title: str) -> int | None:
    found = subprocess.run(["pgrep", "-f", title], capture_output=True, text=True).stdout.split()
    return int(found[0]) if found else None


def start(processes: dict[str, str], seconds: float, out: Path) -> list[subprocess.Popen[bytes]]:
    """Starts the samplers (flame graph and collapsed stacks per process); wait on what it returns."""
    out.mkdir(parents=True, exist_ok=True)
    samplers = []
    for name, title in processes.items():
        pid = pid_of(title)
        if pid is None:
            print(f"no process {title!r} to profile", flush=True)
            continue
        for form, suffix in (("flamegraph", "svg"), ("raw", "txt")):
            command = [PY_SPY, "record", "--nonblocking", "-r", str(RATE_HZ), "-d", str(int(seconds))]
            command += ["-p", str(pid), "-f", form, "-o", str(out / f"{name}.{suffix}")]
            samplers.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
    return samplers


def top_frames(collapsed: Path, count: int = 15) -> list[tuple[str, float]]:
    """The frames holding the most samples (inclusive), as shares of all samples of the process."""
    total = 0
    inclusive: collections.Counter[str] = collections.Counter()
    for line in collapsed.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        if not samples.isdigit():
            continue
        total += int(samples)
        for frame in set(stack.split(";")):
            inclusive[frame] += int(samples)
    return [(frame, n / total) for frame, n in inclusive.most_common(count)] if total else []
