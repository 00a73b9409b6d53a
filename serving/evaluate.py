"""`serving evaluate`: the offline release gate. Runs a candidate variant and its baseline on an evaluation
set in real vLLM engines (one at a time, each in a child process: `serving.release.answers`), scores the
pair (`serving.release.scoring`), writes the report (JSON, Markdown, PNG plots: `serving.release.report`),
and records the verdict, with the report's path and digest, in the candidate's provenance manifest.

The baseline runs first: the candidate's engine must score the baseline's answers (teacher forcing) to
measure score drift as the shadower does.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from serving.config import GateConfig
from serving.evals import DEMO_SET, EvalSetError, load_eval_set
from serving.hardware import host
from serving.models import manifest
from serving.release import answers, report, scoring


class EvaluateError(ValueError):
    """The evaluation cannot start or finish; the message says what to fix."""


@dataclass(frozen=True)
class Evaluation:
    report: dict[str, Any]
    json_path: Path
    markdown_path: Path
    plots: list[Path]
    digest: str

    @property
    def passed(self) -> bool:
        return bool(self.report["verdict"]["passed"])


def default_baseline(candidate: Path) -> Path:
    """The family's base variant, as the candidate's manifest names it (a folder beside the candidate)."""
    found = manifest.read_manifest(candidate)
    return (candidate.parent / str(found["base_model"]["path"])).resolve()


def _variant(folder: Path, role: str) -> dict[str, Any]:
    if not folder.is_dir():
        raise EvaluateError(f"the {role} folder {folder} does not exist (build it: serving models build)")
    try:
        return manifest.read_manifest(folder)
    except manifest.ManifestError as exc:
        raise EvaluateError(f"the {role}: {exc}") from None


def evaluate(
    candidate: Path,
    baseline: Path | None = None,
    eval_set: Path = DEMO_SET,
    out_dir: Path = Path("reports"),
    gate: GateConfig | None = None,
    *,
    record: bool = True,
    say: Callable[[str], None] = print,
) -> Evaluation:
    gate = gate or GateConfig()
    candidate = candidate.resolve()
    cand_manifest = _variant(candidate, "candidate")
    baseline = (baseline or default_baseline(candidate)).resolve()
    base_manifest = _variant(baseline, "baseline")
    if not eval_set.is_file():
        raise EvaluateError(f"the evaluation set {eval_set} does not exist")
    try:
        items = load_eval_set(eval_set)
    except EvalSetError as exc:
        raise EvaluateError(f"bad evaluation set: {exc}") from None
    if not items:
        raise EvaluateError(f"the evaluation set {eval_set} holds no items")
    base_name, cand_name = base_manifest["variant"], cand_manifest["variant"]

    say(f"[1/3] baseline {base_name}: {len(items)} prompts in a vLLM engine ({baseline})")
    started = time.monotonic()
    base_run = _run(baseline, eval_set, reverse=False, reference=None)
    say(f"      done in {time.monotonic() - started:.0f} s, {base_run['output_tokens_per_s']:.1f} output tokens/s")
    say(f"[2/3] candidate {cand_name}: the same prompts in reverse order, scoring {base_name}'s answers ({candidate})")
    started = time.monotonic()
    cand_run = _run(candidate, eval_set, reverse=True, reference=base_run["answers"])
    say(f"      done in {time.monotonic() - started:.0f} s, {cand_run['output_tokens_per_s']:.1f} output tokens/s")

    say("[3/3] scoring and writing the report")
    results = scoring.score_items(items, base_run, cand_run)
    tasks = scoring.by_task(results)
    overall = scoring.summarize(results)
    performance = _performance(base_run, cand_run)
    measures = scoring.gate_measures(overall, tasks, performance)
    checks = scoring.judge(measures, gate.thresholds())
    built = {
        "schema_version": 1,
        "evaluated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": host(),
        "max_tokens": answers.MAX_TOKENS,
        "eval_set": {"path": str(eval_set.resolve()), "sha256": manifest.file_sha256(eval_set), "items": len(items)},
        "baseline": _side(baseline, base_manifest, base_run),
        "candidate": _side(candidate, cand_manifest, cand_run),
        "thresholds": gate.thresholds(),
        "overall": overall,
        "tasks": tasks,
        "performance": performance,
        "measures": measures,
        "verdict": {
            "passed": scoring.passed(checks),
            "checks": [{**vars(c), "passed": c.passed} for c in checks],
        },
        "items": scoring.item_rows(results),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir.resolve() / f"{cand_name}-vs-{base_name}"
    json_path = stem.with_suffix(".json")
    digest = report.write_json(built, json_path)
    plots = report.plot(built, stem)
    markdown_path = stem.with_suffix(".md")
    markdown_path.write_text(report.markdown(built, plots))
    evaluation = Evaluation(built, json_path, markdown_path, plots, digest)
    if record:
        manifest.record_gate(candidate, base_manifest["weights_sha256"], gate_record(evaluation))
    return evaluation


def _run(folder: Path, eval_set: Path, *, reverse: bool, reference: list[dict[str, Any]] | None) -> dict[str, Any]:
    try:
        return answers.run_engine(folder, eval_set, reverse=reverse, reference=reference)
    except answers.EngineRunError as exc:
        raise EvaluateError(str(exc)) from None


def _side(folder: Path, found: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    return {
        "folder": str(folder),
        "variant": found["variant"],
        "precision": found["precision"],
        "weights_sha256": found["weights_sha256"],
        "dtype": run["dtype"],
    }


def _performance(base: dict[str, Any], cand: dict[str, Any]) -> dict[str, Any]:
    def side(run: dict[str, Any]) -> dict[str, Any]:
        return {
            "median_latency_s": run["median_latency_s"],
            "latency_samples": run["latency"],
            "output_tokens_per_s": run["output_tokens_per_s"],
            "rss_bytes": run["rss_bytes"],
            "rss_gib": run["rss_bytes"] / 2**30,
            "weights_bytes": run["weights_bytes"],
        }

    return {
        "baseline": side(base),
        "candidate": side(cand),
        "latency_ratio": cand["median_latency_s"] / base["median_latency_s"],
        "throughput_ratio": cand["output_tokens_per_s"] / base["output_tokens_per_s"],
        "rss_ratio": cand["rss_bytes"] / base["rss_bytes"],
    }


def gate_record(evaluation: Evaluation) -> dict[str, Any]:
    """What the candidate's manifest keeps of an evaluation: the verdict, why, and where the report is."""
    built = evaluation.report
    return {
        "passed": evaluation.passed,
        "baseline": {k: built["baseline"][k] for k in ("variant", "folder", "weights_sha256")},
        "candidate_weights_sha256": built["candidate"]["weights_sha256"],
        "measures": built["measures"],
        "thresholds": built["thresholds"],
        "checks": built["verdict"]["checks"],
        "eval_set": built["eval_set"],
        "evaluated_at": built["evaluated_at"],
        "report": {"path": str(evaluation.json_path), "sha256": evaluation.digest},
    }


def sign_off(candidate: Path, by: str, baseline: Path | None = None) -> dict[str, Any]:
    """Records a named sign-off on the candidate's passed gate against the baseline; returns that gate.
    The report must still be where the gate says, with the digest it had: a sign-off is given on it."""
    candidate = candidate.resolve()
    _variant(candidate, "candidate")
    baseline = (baseline or default_baseline(candidate)).resolve()
    baseline_sha = _variant(baseline, "baseline")["weights_sha256"]
    if not by.strip():
        raise EvaluateError("a sign-off needs a name (--by NAME)")
    gate = manifest.gate_for(manifest.read_manifest(candidate), baseline_sha)
    if gate is None:
        raise EvaluateError(f"{candidate} has no release gate against {baseline}; run: serving evaluate {candidate}")
    path = Path(gate["report"]["path"])
    if not path.is_file() or manifest.file_sha256(path) != gate["report"]["sha256"]:
        raise EvaluateError(f"the gate's report {path} is missing or changed since the evaluation; evaluate again")
    try:
        found = manifest.record_sign_off(candidate, baseline_sha, by.strip())
    except manifest.ManifestError as exc:
        raise EvaluateError(str(exc)) from None
    signed: dict[str, Any] = manifest.gate_for(found, baseline_sha) or {}
    return signed
