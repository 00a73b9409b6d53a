"""Where the verification floor comes from: each built variant's agreement with fp16 on the verification facts
(`serving.engine.verify`, as the engines judge it at start-up), beside a deliberately broken copy of fp16 (its embedding
rows shuffled: `serving.models.broken`) and the garbage answers seen on an AMX Xeon (STACK.md, quirk 10), on
this machine, in one run. Writes results/verification.json and prints the table the README quotes.

    .venv/bin/python loadtests/verification.py [--family smol --family tiny] [--out results/verification.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from serving.engine import verify
from serving.models import broken, build, family, probe

REPO = Path(__file__).resolve().parents[1]
# int8 in bfloat16 through vLLM's SGL kernel on an AMX Xeon (issue 25), for "What is the capital of France?".
AMX_GARBAGE = "L'Étoile, la Cité, le Poulsadère, la France, la France, la France"


def answers_of(folder: Path, dtype: str | None = None) -> tuple[verify.Answer, ...]:
    report = probe.run_probe(folder, dtype=dtype)
    return verify.answers_from(report["verification_answers"])


def measure(models: family.Family, folder: Path) -> dict[str, Any]:
    reference = answers_of(folder / models.base.folder)
    said: dict[str, tuple[verify.Answer, ...]] = {}
    for variant in models.quantized:
        said[variant.name] = answers_of(folder / variant.folder)
    with tempfile.TemporaryDirectory() as scratch:
        said["garbled fp16"] = answers_of(broken.garble(folder / models.base.folder, Path(scratch) / "garbled"))
    rows = {name: verify.agreement(mine, reference) for name, mine in said.items()}
    france = [verify.Answer(reference[0].id, reference[0].prompt, AMX_GARBAGE)]
    rows["AMX bfloat16 garbage (1 fact)"] = verify.agreement(france, reference[:1])
    return {
        "agreement": {name: {"agreement": round(score, 3), "same": same} for name, (score, same) in rows.items()},
        "answers": {"fp16": [a.text for a in reference]} | {n: [a.text for a in a_] for n, a_ in said.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--family", action="append", choices=list(family.FAMILIES))
    parser.add_argument("--out", type=Path, default=REPO / "results" / "verification.json")
    args = parser.parse_args()
    results: dict[str, Any] = {"machine": verify.machine(), "floor": verify.MIN_AGREEMENT, "families": {}}
    for name in args.family or ["smol", "tiny"]:
        models = family.get(name)
        folder = build.default_out(models)
        if not (folder / models.base.folder).is_dir():
            print(f"{name}: not built (make models FAMILY={name})", file=sys.stderr)
            return 1
        results["families"][name] = measure(models, folder)
        for variant, row in results["families"][name]["agreement"].items():
            print(f"{name:5} {variant:30} agreement {row['agreement']:.3f} ({row['same']} the same)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
