"""The summary table and the plot of a load run (loadtests/scenarios.py), from its requests.jsonl and
events.jsonl; it can be rerun on a finished run's folder:

    .venv/bin/python loadtests/loadreport.py results/loadtests/NAME
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from matplotlib.dates import DateFormatter, date2num
from matplotlib.figure import Figure

EVENT_COLORS = {
    "weight": "tab:blue",
    "rollback": "tab:red",
    "no-rollback": "tab:orange",
    "kill": "black",  # a replica or the controller killed (soak.py)
    "replica-start": "tab:green",  # a replica start the rollout controller saw
}


def read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def when(t: float) -> str:
    return f"{datetime.fromtimestamp(t, UTC):%H:%M:%S}"


def summary(requests: list[dict[str, Any]], events: list[dict[str, Any]]) -> str:
    """A markdown table per scenario, tier and variant, then the events."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in requests:
        groups[(r["scenario"], r["tier"], r["variant"] or "-")].append(r)
    order = [e["detail"].split()[0] for e in events if e["kind"] == "scenario"]  # as they ran
    lines = [
        "| scenario | tier | variant | requests | errors | req/s | TTFT p50 / p95 (ms) | latency p50/p95/p99 (ms) |",
        "|---|---|---|---:|---:|---:|---|---|",
    ]
    for (scenario, tier, variant), rows in sorted(
        groups.items(), key=lambda item: (order.index(item[0][0]) if item[0][0] in order else len(order), item[0])
    ):
        ok = [r for r in rows if r["status"] == 200]
        ttfts = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
        latencies = [r["latency_s"] for r in ok]
        span = max(r["t"] + r["latency_s"] for r in rows) - min(r["t"] for r in rows)
        lines.append(
            f"| {scenario} | {tier} | {variant} | {len(rows)} | {len(rows) - len(ok)} | {len(rows) / max(span, 1):.2f} "
            f"| {ms(quantile(ttfts, 0.5))} / {ms(quantile(ttfts, 0.95))} "
            f"| {ms(quantile(latencies, 0.5))} / {ms(quantile(latencies, 0.95))} / {ms(quantile(latencies, 0.99))} |"
        )
    lines += ["", "| time (UTC) | event |", "|---|---|"]
    lines += [f"| {when(e['t'])} | {e['kind']}: {e['detail']} |" for e in events]
    return "\n".join(lines) + "\n"


def plot(requests: list[dict[str, Any]], events: list[dict[str, Any]], out: Path) -> None:
    """Latency over time, one colour per variant (failed requests as crosses); scenario starts as grey
    lines, weight changes blue, rollbacks red, kills black, replica starts the controller saw green."""
    figure = Figure(figsize=(13, 5.5))
    axes = figure.add_subplot()
    by_variant: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in requests:
        by_variant[r["variant"] or "failed"].append(r)
    for variant, rows in sorted(by_variant.items(), key=lambda item: -len(item[1])):  # the rarest on top
        ok = [r for r in rows if r["status"] == 200]
        failed = [r for r in rows if r["status"] != 200]
        if ok:
            axes.scatter([x(r["t"]) for r in ok], [r["latency_s"] for r in ok], s=8, alpha=0.7, label=variant)
        if failed:
            axes.scatter([x(r["t"]) for r in failed], [r["latency_s"] for r in failed], s=24, marker="x",
                         color="black", label="failed" if variant == "failed" else f"{variant}: failed")  # fmt: skip
    top = max((r["latency_s"] for r in requests), default=1.0)
    for e in events:
        color = EVENT_COLORS.get(e["kind"], "grey")
        style = ":" if e["kind"] == "scenario" else "--"
        axes.axvline(x(e["t"]), color=color, linestyle=style, linewidth=1.2)
        axes.text(x(e["t"]), top * 1.02, f" {e['detail']}", rotation=90, va="bottom", ha="right", fontsize=7,
                  color=color)  # fmt: skip
    axes.set_ylim(0, top * 1.6)
    axes.set_ylabel("latency (s): request sent to last token")
    axes.set_xlabel("time (UTC)")
    axes.xaxis.set_major_formatter(DateFormatter("%H:%M:%S"))  # type: ignore[no-untyped-call]
    axes.legend(loc="upper left", fontsize=8, ncol=4, markerscale=2)
    axes.set_title(
        "Latency per request by variant; grey: scenario starts, blue: weight changes, red: rollbacks, black: kills"
    )
    figure.tight_layout()
    figure.savefig(out, dpi=110)


def x(t: float) -> float:
    return float(date2num(datetime.fromtimestamp(t, UTC)))  # type: ignore[no-untyped-call]


def write(folder: Path) -> str:
    requests, events = read(folder / "requests.jsonl"), read(folder / "events.jsonl")
    text = summary(requests, events)
    (folder / "summary.md").write_text(text)
    plot(requests, events, folder / "latency.png")
    return text


if __name__ == "__main__":
    print(write(Path(sys.argv[1])))
