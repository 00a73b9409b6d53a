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
from serving.engine.hardware import host
from serving.evals import DEMO_SET, EvalItem, EvalSetError, load_eval_set
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
    if found["quantization"] is None:
        return candidate.resolve()  # the base itself: evaluating it measures the noise floor
    relative = (found["base_model"] or {}).get("path")
    if relative is None:
        raise EvaluateError(f"{candidate}'s manifest names no base folder; name the baseline with --baseline")
    return (candidate.parent / str(relative)).resolve()


def _variant(folder: Path, role: str) -> dict[str, Any]:
    if not folder.is_dir():
        raise EvaluateError(f"the {role} folder {folder} does not exist (build it: serving models build)")
    try:
        return manifest.read_manifest(folder)
    except manifest.ManifestError as exc:
        raise EvaluateError(f"the {role}: {exc}") from None


def evaluate(
    candidates: list[Path],
    baseline: Path | None = None,
    eval_set: Path = DEMO_SET,
    out_dir: Path = Path("reports"),
    gate: GateConfig | None = None,
    *,
    record: bool = True,
    say: Callable[[str], None] = print,
) -> list[Evaluation]:
    """Evaluates each candidate against the one baseline, which runs once. A candidate with the baseline's
    own weights (fp16 against itself) measures the noise floor and is never recorded as a gate."""
    gate = gate or GateConfig()
    if not candidates:
        raise EvaluateError("name at least one candidate variant folder")
    candidates = [c.resolve() for c in candidates]
    manifests = [_variant(c, "candidate") for c in candidates]
    if baseline is None:
        defaults = {default_baseline(c) for c in candidates}
        if len(defaults) > 1:
            raise EvaluateError("the candidates come from different families; name the baseline with --baseline")
        (baseline,) = defaults
    baseline = baseline.resolve()
    base_manifest = _variant(baseline, "baseline")
    if not eval_set.is_file():
        raise EvaluateError(f"the evaluation set {eval_set} does not exist")
    try:
        items = load_eval_set(eval_set)
    except EvalSetError as exc:
        raise EvaluateError(f"bad evaluation set: {exc}") from None
    if not items:
        raise EvaluateError(f"the evaluation set {eval_set} holds no items")
    steps = 1 + len(candidates)
    base_name = base_manifest["variant"]

    say(f"[1/{steps}] baseline {base_name}: {len(items)} prompts in a vLLM engine ({baseline})")
    started = time.monotonic()
    base_run = _run(baseline, eval_set, reverse=False, reference=None)
    say(f"      done in {time.monotonic() - started:.0f} s, {base_run['output_tokens_per_s']:.1f} output tokens/s")
    evaluations = []
    for step, (candidate, cand_manifest) in enumerate(zip(candidates, manifests, strict=True), start=2):
        name = cand_manifest["variant"]
        say(
            f"[{step}/{steps}] candidate {name}: the prompts in reverse order, "
            f"scoring {base_name}'s answers ({candidate})"
        )
        started = time.monotonic()
        cand_run = _run(candidate, eval_set, reverse=True, reference=base_run["answers"])
        built = _report(
            items, eval_set, gate, (baseline, base_manifest, base_run), (candidate, cand_manifest, cand_run)
        )
        evaluation = _write(built, out_dir, f"{name}-vs-{base_name}")
        verdict = "PASS" if evaluation.passed else "FAIL"
        say(f"      done in {time.monotonic() - started:.0f} s: {verdict}, report {evaluation.markdown_path}")
        if cand_manifest["weights_sha256"] == base_manifest["weights_sha256"]:
            say("      the baseline against itself: the noise floor, not recorded as a gate")
        elif record:
            manifest.record_gate(candidate, base_manifest["weights_sha256"], gate_record(evaluation))
        evaluations.append(evaluation)
    return evaluations


Side = tuple[Path, dict[str, Any], dict[str, Any]]  # folder, manifest, what its engine run recorded


def _report(items: list[EvalItem], eval_set: Path, gate: GateConfig, base: Side, cand: Side) -> dict[str, Any]:
    results = scoring.score_items(items, base[2], cand[2])
    tasks = scoring.by_task(results)
    overall = scoring.summarize(results)
    performance = _performance(base[2], cand[2])
    measures = scoring.gate_measures(overall, tasks, performance)
    checks = scoring.judge(measures, gate.thresholds())
    return {
        "schema_version": 1,
        "evaluated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": host(),
        "max_tokens": answers.MAX_TOKENS,
        "eval_set": {"path": str(eval_set.resolve()), "sha256": manifest.file_sha256(eval_set), "items": len(items)},
        "baseline": _side(*base),
        "candidate": _side(*cand),
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


def _write(built: dict[str, Any], out_dir: Path, name: str) -> Evaluation:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir.resolve() / name
    json_path = stem.with_suffix(".json")
    digest = report.write_json(built, json_path)
    plots = report.plot(built, stem)
    markdown_path = stem.with_suffix(".md")
    markdown_path.write_text(report.markdown(built, plots))
    return Evaluation(built, json_path, markdown_path, plots, digest)


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
