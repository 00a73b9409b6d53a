"""Loads one variant folder in a real vLLM engine and reports what the engine sees: the quantization
it detected, the activation dtype chosen for this hardware (`serving.engine.hardware`, as the served engines
choose it), the kernel behind each kind of linear layer, and greedy completions of a fixed prompt set.

Run as a child process (vLLM spawns its engine process, so this needs its own `__main__`):

    python -m serving.models.probe VARIANT_DIR report.json [EVAL_SET.jsonl] [--dtype DTYPE]

The report always holds the greedy chat answers to the verification facts (`serving.engine.verify`), which
`serving models build` judges. With an evaluation set (`serving.evals`), it also holds the variant's
greedy chat answer to each of its prompts and the output tokens per second it took to answer them all
(after a warm-up). `--dtype` runs the engine in that activation dtype instead of the first of the order.
`token_agreement` then turns two reports into the offline agreement measure the tests use.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from serving.models import family

MAX_TOKENS = 32
NUM_PROMPTS = 16
EVAL_MAX_TOKENS = 48


def prompts() -> list[str]:
    """The fixed prompt set: the opening words of the corpus paragraphs, in corpus order."""
    paragraphs = [p.strip() for p in family.corpus_text().split("\n\n") if len(p.split()) >= 12]
    step = max(1, len(paragraphs) // NUM_PROMPTS)
    return [" ".join(p.split()[:10]) for p in paragraphs[::step][:NUM_PROMPTS]]


def probe(folder: Path, eval_set: Path | None = None, dtype: str | None = None) -> dict[str, Any]:
    from vllm import LLM, SamplingParams

    from serving.engine import hardware
    from serving.engine.kernels import WORKER_EXTENSION, merge

    # The same first choice the served engines take, from the same capability probe, unless told another.
    capabilities = hardware.detect()
    pinned = dtype if dtype in hardware.DTYPES else None
    choice = hardware.choose_dtype(hardware.weights_dtype(folder), capabilities, pinned)
    llm = LLM(
        model=str(folder),
        max_model_len=1024,
        seed=0,
        enforce_eager=True,
        dtype=choice.dtype,
        worker_extension_cls=WORKER_EXTENSION,
    )
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate(prompts(), params, use_tqdm=False)
    answers = answer_eval_set(llm, eval_set) if eval_set else {}
    return {
        **answers,
        "verification_answers": answer_facts(llm),
        "folder": str(folder),
        "hardware": capabilities.as_dict(),
        "dtype_choice": {"dtype": choice.dtype, "reason": choice.reason},
        "engine_quantization": llm.llm_engine.model_config.quantization,
        "engine_dtype": str(llm.llm_engine.model_config.dtype).removeprefix("torch."),
        "linear_kernels": merge(llm.collective_rpc("linear_kernels")),
        "token_ids": [list(o.outputs[0].token_ids) for o in outputs],
        "texts": [o.outputs[0].text for o in outputs],
    }


def answer_facts(llm: Any) -> list[dict[str, str]]:
    """Greedy chat answers to the verification facts, as a served engine gives them at start-up."""
    from vllm import SamplingParams

    from serving.engine import verify

    items = verify.facts()
    chats = [[{"role": "user", "content": item.prompt}] for item in items]
    outputs = llm.chat(chats, SamplingParams(temperature=0.0, max_tokens=verify.MAX_TOKENS), use_tqdm=False)
    return [{"id": i.id, "prompt": i.prompt, "text": o.outputs[0].text} for i, o in zip(items, outputs, strict=True)]


def answer_eval_set(llm: Any, path: Path) -> dict[str, Any]:
    """Greedy chat answers to every prompt of the set, all at once, as a server would batch them."""
    from vllm import SamplingParams

    from serving.evals import load_eval_set

    items = load_eval_set(path)
    chats = [[{"role": "user", "content": item.prompt}] for item in items]
    params = SamplingParams(temperature=0.0, max_tokens=EVAL_MAX_TOKENS)
    llm.chat(chats[:4], params, use_tqdm=False)  # warm-up: the first batch pays one-time costs
    started = time.perf_counter()
    outputs = llm.chat(chats, params, use_tqdm=False)
    took = time.perf_counter() - started
    answers = [
        {"id": item.id, "text": o.outputs[0].text, "token_ids": list(o.outputs[0].token_ids)}
        for item, o in zip(items, outputs, strict=True)
    ]
    return {
        "eval_set": str(path),
        "answers": answers,
        "output_tokens_per_s": sum(len(a["token_ids"]) for a in answers) / took,
    }


def token_agreement(reference: list[list[int]], candidate: list[list[int]]) -> float:
    """Mean over prompts of the share of positions where the two greedy continuations agree."""
    from serving.shadow.compare import token_agreement as pair_agreement

    if len(reference) != len(candidate) or not reference:
        raise ValueError("token agreement needs two non-empty reports over the same prompts")
    return sum(pair_agreement(r, c) for r, c in zip(reference, candidate, strict=True)) / len(reference)


def run_probe(
    folder: Path, eval_set: Path | None = None, python: str = sys.executable, dtype: str | None = None
) -> dict[str, Any]:
    """Runs `probe` in a child process and returns its report; raises `RuntimeError` with the child's
    error output when the engine fails."""
    import subprocess
    import tempfile

    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    with tempfile.TemporaryDirectory() as scratch:
        report_path = Path(scratch) / "report.json"
        done = subprocess.run(
            [
                python,
                "-m",
                "serving.models.probe",
                str(folder),
                str(report_path),
                *([str(eval_set)] if eval_set else []),
                *(["--dtype", dtype] if dtype else []),
            ],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0 or not report_path.exists():
            raise RuntimeError(f"probing {folder} failed:\n{done.stderr[-4000:]}")
        report: dict[str, Any] = json.loads(report_path.read_text())
    return report


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folder", type=Path)
    parser.add_argument("report", type=Path)
    parser.add_argument("eval_set", type=Path, nargs="?")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"])
    args = parser.parse_args(argv)
    args.report.write_text(json.dumps(probe(args.folder, args.eval_set, args.dtype)))


if __name__ == "__main__":
    main()
