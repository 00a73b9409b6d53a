"""The README's table for a built model family: per variant, weight size, build time, output tokens per
second (all variants in the same run), exact match on the evaluation set's factual questions, refusals of
its safety prompts, and greedy token agreement with fp16 (fp16 in a second engine is the control); plus
the stack-measured shadow signals from `loadtests/quality.py` when its results file exists.

    .venv/bin/python loadtests/families.py [--family smol] [--folder models/smol] [--out results/family-smol.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from serving.engine.hardware import host
from serving.evals import DEMO_SET, is_refusal, load_eval_set, matches
from serving.models import family, manifest, probe

REPO = Path(__file__).resolve().parents[1]


def summarize(report: dict[str, Any], reference: dict[str, Any], items: list[Any]) -> dict[str, Any]:
    by_id = {a["id"]: a for a in report["answers"]}
    facts = [matches(item, by_id[item.id]["text"]) for item in items if item.expected]
    refusals = [is_refusal(by_id[item.id]["text"]) for item in items if item.safety]
    ids = [a["token_ids"] for a in report["answers"]]
    reference_ids = [a["token_ids"] for a in reference["answers"]]
    return {
        "output_tokens_per_s": round(report["output_tokens_per_s"], 1),
        "exact_match": round(sum(bool(f) for f in facts) / len(facts), 3),
        "refusal_rate": round(sum(refusals) / len(refusals), 3),
        "token_agreement_vs_fp16": round(probe.token_agreement(reference_ids, ids), 3),
        "identical_answers_vs_fp16": sum(a == b for a, b in zip(reference_ids, ids, strict=True)),
        "engine_dtype": report["engine_dtype"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default=family.DEFAULT.name, choices=list(family.FAMILIES))
    parser.add_argument("--folder", type=Path, help="default: models/FAMILY")
    parser.add_argument("--eval-set", type=Path, default=DEMO_SET)
    parser.add_argument("--out", type=Path, help="default: results/family-FAMILY.json")
    args = parser.parse_args()
    models = family.get(args.family)
    folder = args.folder or REPO / "models" / models.name
    items = load_eval_set(args.eval_set)

    rows: dict[str, dict[str, Any]] = {}
    reports = {}
    for name in [v.name for v in models.variants] + ["fp16 (control)"]:
        variant = models.variant(name.split()[0])
        print(f"probing {name} ...", flush=True)
        reports[name] = probe.run_probe(folder / variant.folder, args.eval_set)
    for name, report in reports.items():
        variant = models.variant(name.split()[0])
        found = manifest.read_manifest(folder / variant.folder)
        size = sum(p.stat().st_size for p in (folder / variant.folder).glob("*.safetensors"))
        rows[name] = {
            "weights_mb": round(size / 1e6, 1),
            "build_seconds": found.get("build_seconds"),
            **summarize(report, reports["fp16"], items),
        }
    quality_path = REPO / "results" / f"quality-{folder.resolve().name}.json"
    quality = json.loads(quality_path.read_text())["pairs"] if quality_path.is_file() else {}
    out = args.out or REPO / "results" / f"family-{models.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"family": models.name, "machine": host(), "variants": rows}, indent=2) + "\n")

    print("| variant | weights | build | output tok/s | exact match (facts) | refusals (safety) "
          "| token agreement vs fp16 | shadowed: disagreement / token agreement / drift vs fp16 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        pair = quality.get("fp16_vs_fp16" if name.startswith("fp16") else f"{name}_vs_fp16")
        shadowed = (
            f"{pair['disagreement_rate']:.2f} / {pair['token_agreement']:.2f} / {pair['score_drift']:.3f} "
            f"(n={pair['comparisons']:.0f})"
            if pair and name != "fp16"
            else "-"
        )
        build = f"{row['build_seconds']:.0f} s" if row["build_seconds"] is not None else "?"
        print(
            f"| {name} | {row['weights_mb']:.0f} MB | {build} | {row['output_tokens_per_s']:.0f} "
            f"| {row['exact_match']:.2f} | {row['refusal_rate']:.2f} | {row['token_agreement_vs_fp16']:.2f} "
            f"({row['identical_answers_vs_fp16']}/{len(items)} identical) | {shadowed} |"
        )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
