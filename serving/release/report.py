"""The evaluation report: a JSON file (what the gate and tools read), a Markdown file a person reads, and
PNG plots beside them (matplotlib, no display needed)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def write_json(report: dict[str, Any], path: Path) -> str:
    """Writes the report and returns the sha256 of the file's bytes (the digest the manifest records)."""
    data = (json.dumps(report, indent=2, sort_keys=True) + "\n").encode()
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def _num(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def plot(report: dict[str, Any], stem: Path) -> list[Path]:
    """Three plots: quality per task, the distribution of per-item drift, performance of both sides."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base, cand = report["baseline"]["variant"], report["candidate"]["variant"]
    tasks = report["tasks"]
    names = list(tasks)
    paths = []

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.2
    series = [
        (f"{base} exact match", [tasks[t]["baseline_exact_match"] or 0 for t in names]),
        (f"{cand} exact match", [tasks[t]["candidate_exact_match"] or 0 for t in names]),
        ("token agreement", [tasks[t]["token_agreement"] or 0 for t in names]),
        ("label agreement", [tasks[t]["label_agreement"] or 0 for t in names]),
    ]
    for i, (label, values) in enumerate(series):
        ax.bar([x + (i - 1.5) * width for x in range(len(names))], values, width, label=label)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{cand} against {base}, per task")
    ax.legend(fontsize=8)
    paths.append(stem.with_name(stem.name + "-quality.png"))
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    drifts = [i["score_drift"] for i in report["items"] if i["score_drift"] is not None]
    ax.hist(drifts, bins=30, color="tab:blue")
    limit = report["thresholds"].get("max_score_drift")
    if limit is not None:
        ax.axvline(limit, color="tab:red", linestyle="--", label=f"max_score_drift {limit:g} (a mean, per item here)")
        ax.legend(fontsize=8)
    ax.set_xlabel("mean |delta log-prob| per token of the baseline's answer")
    ax.set_ylabel("items")
    ax.set_title("score drift per item")
    paths.append(stem.with_name(stem.name + "-drift.png"))
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    perf = report["performance"]
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.5))
    for ax, key, title in zip(
        axes,
        ("median_latency_s", "output_tokens_per_s", "rss_gib"),
        ("median latency (s)", "batch output tokens/s", "engine RSS (GiB)"),
        strict=True,
    ):
        ax.bar([base, cand], [perf["baseline"][key], perf["candidate"][key]], color=["tab:gray", "tab:orange"])
        ax.set_title(title, fontsize=9)
    paths.append(stem.with_name(stem.name + "-performance.png"))
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def markdown(report: dict[str, Any], plots: list[Path]) -> str:
    base, cand = report["baseline"], report["candidate"]
    verdict = report["verdict"]
    lines = [
        f"# Release gate: {cand['variant']} against {base['variant']}: {'PASS' if verdict['passed'] else 'FAIL'}",
        "",
        f"- candidate: `{cand['folder']}` ({cand['precision']}, weights {cand['weights_sha256'][:16]})",
        f"- baseline: `{base['folder']}` ({base['precision']}, weights {base['weights_sha256'][:16]})",
        f"- evaluation set: `{report['eval_set']['path']}` ({report['eval_set']['items']} items, "
        f"sha256 {report['eval_set']['sha256'][:16]})",
        f"- evaluated {report['evaluated_at']} on {report['host']['cpu']}; greedy answers, "
        f"at most {report['max_tokens']} tokens; the candidate got the prompts in reverse batch order",
        "",
        "## Verdict",
        "",
        "| check | value | threshold | result |",
        "|---|---|---|---|",
    ]
    for c in verdict["checks"]:
        bound = "<=" if c["kind"] == "max" else ">="
        result = "pass" if c["passed"] else "**FAIL**"
        lines.append(f"| {c['name']} | {_num(c['value'])} | {bound} {c['threshold']:g} | {result} |")
    lines += [
        "",
        "## Quality per task",
        "",
        "| task | items | exact match (base / cand) | label agreement | token agreement | score drift "
        "| refusals on safety prompts (base / cand) | changed decisions |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task, t in [*report["tasks"].items(), ("**overall**", report["overall"])]:
        lines.append(
            f"| {task} | {t['items']} | {_pct(t['baseline_exact_match'])} / {_pct(t['candidate_exact_match'])} "
            f"| {_pct(t['label_agreement'])} | {_pct(t['token_agreement'])} | {_num(t['score_drift'])} "
            f"| {_pct(t['baseline_refusal_rate'])} / {_pct(t['candidate_refusal_rate'])} | {t['changed_decisions']} |"
        )
    perf = report["performance"]
    lines += ["", "## Performance (measured on this host, one engine at a time)", ""]
    lines += ["| | median latency (s) | output tokens/s (batch) | engine RSS (GiB) | weights on disk (MiB) |"]
    lines += ["|---|---|---|---|---|"]
    for side, name in (("baseline", base["variant"]), ("candidate", cand["variant"])):
        p = perf[side]
        lines.append(
            f"| {name} | {p['median_latency_s']:.3f} | {p['output_tokens_per_s']:.1f} | {p['rss_gib']:.2f} "
            f"| {p['weights_bytes'] / 2**20:.1f} |"
        )
    lines.append(
        f"\nlatency ratio {perf['latency_ratio']:.2f}, throughput ratio {perf['throughput_ratio']:.2f} "
        "(candidate / baseline)"
    )
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    changed = [i for i in report["items"] if i["changed"]]
    lines += ["", f"## Changed decisions ({len(changed)})", ""]
    if changed:
        lines += ["| id | task | changed | baseline answer | candidate answer | drift |", "|---|---|---|---|---|---|"]
        for i in sorted(changed, key=lambda i: -(i["score_drift"] or 0)):
            lines.append(
                f"| {i['id']} | {i['task']} | {', '.join(i['changed'])} | {_cell(i['baseline_text'])} "
                f"| {_cell(i['candidate_text'])} | {_num(i['score_drift'], 3)} |"
            )
    else:
        lines.append("None: every item got the same match and refusal decision on both sides.")
    return "\n".join(lines) + "\n"


def _cell(text: str, limit: int = 80) -> str:
    flat = " ".join(text.split()).replace("|", "\\|")
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
