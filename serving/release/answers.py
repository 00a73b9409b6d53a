"""One variant's side of an evaluation, run in a child process (vLLM spawns its engine process, so this
needs its own `__main__`; `run_engine` starts it):

    python -m serving.release.answers VARIANT_DIR EVAL_SET.jsonl OUT.json [--reverse] [--score ANSWERS.json]

It loads the variant in a real vLLM engine (the dtype the served engines choose on this hardware) and
records: greedy chat answers to every prompt (all at once, as a server batches them; `--reverse` sends
them in reverse order, so that an fp16-against-itself run measures batch-order noise too), the output
tokens per second of that batch (after a warm-up), the latency of single requests answered one at a
time, the resident memory of the engine's processes, and the teacher-forced log-probability of each
token of the reference answers (`--score`, the baseline's answers; without it, its own answers), the
scoring that `serving.shadow.compare` defines for the shadower.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MAX_TOKENS = 48  # as serving.models.probe: short answers; the facts set wants a word, not an essay
LATENCY_SAMPLES = 8  # single requests timed one at a time (answering all 100 one by one costs minutes on smol)


def answer(folder: Path, eval_set: Path, *, reverse: bool, reference: list[dict[str, Any]] | None) -> dict[str, Any]:
    import psutil  # type: ignore[import-untyped]  # (vLLM and Ray depend on it)
    from vllm import LLM, SamplingParams

    from serving.engine import hardware
    from serving.engine.verify import dtype_choices
    from serving.evals import load_eval_set
    from serving.models import manifest

    items = load_eval_set(eval_set)
    capabilities = hardware.detect()
    precision = manifest.read_manifest(folder)["precision"]
    choice = dtype_choices(folder, capabilities)[0]  # the dtype this machine's verification kept, as the engines
    llm = LLM(model=str(folder), max_model_len=1024, seed=0, enforce_eager=True, dtype=choice.dtype)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    order = list(reversed(items)) if reverse else items
    chats = [[{"role": "user", "content": item.prompt}] for item in order]
    llm.chat(chats[:4], params, use_tqdm=False)  # warm-up: the first batch pays one-time costs
    started = time.perf_counter()
    outputs = llm.chat(chats, params, use_tqdm=False)
    took = time.perf_counter() - started
    by_id = {
        item.id: {
            "id": item.id,
            "text": o.outputs[0].text,
            "token_ids": list(o.outputs[0].token_ids),
            "prompt_token_ids": list(o.prompt_token_ids or []),
        }
        for item, o in zip(order, outputs, strict=True)
    }
    answers = [by_id[item.id] for item in items]  # file order again, whatever order they were sent in
    phase("answered")
    latencies = []
    for item in items[:LATENCY_SAMPLES]:  # the same prompts on both sides, whatever the batch order
        chat = [{"role": "user", "content": item.prompt}]
        begun = time.perf_counter()
        single = llm.chat([chat], params, use_tqdm=False)
        latencies.append({"seconds": time.perf_counter() - begun, "tokens": len(single[0].outputs[0].token_ids)})
    phase("timed single requests")
    scored = reference if reference is not None else answers
    logprobs = teacher_forced(llm, scored)
    for entry, values in zip(answers, logprobs, strict=True):
        entry["reference_logprobs"] = values
    phase("scored the reference answers")
    me = psutil.Process()
    engine = [me, *me.children(recursive=True)]
    return {
        "folder": str(folder),
        "precision": precision,
        "weights_sha256": manifest.read_manifest(folder)["weights_sha256"],
        "dtype": choice.dtype,
        "answers": answers,
        "output_tokens_per_s": sum(len(a["token_ids"]) for a in answers) / took,
        "latency": latencies,
        "median_latency_s": statistics.median(sample["seconds"] for sample in latencies),
        "rss_bytes": sum(p.memory_info().rss for p in engine if p.is_running()),
        "weights_bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors")),
    }


def teacher_forced(llm: Any, reference: list[dict[str, Any]]) -> list[list[float]]:
    """This engine's log-probability of every token of each reference answer, read after its prompt."""
    from vllm import SamplingParams

    from serving.shadow.shadower import logprob_of

    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    prompts = [{"prompt_token_ids": r["prompt_token_ids"] + r["token_ids"]} for r in reference]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    values = []
    for r, o in zip(reference, outputs, strict=True):
        positions = list(o.prompt_logprobs or [])[len(r["prompt_token_ids"]) :]
        values.append([logprob_of(token, position) for token, position in zip(r["token_ids"], positions, strict=True)])
    return values


def phase(done: str) -> None:
    """A marker on stderr: when the engine dies, the tail of its stderr says how far it got."""
    print(f"serving.release.answers: {done}", file=sys.stderr, flush=True)


class EngineRunError(RuntimeError):
    """The child process running one variant failed; the message holds the tail of its stderr."""


def run_engine(
    folder: Path, eval_set: Path, *, reverse: bool = False, reference: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Runs `answer` for one variant in a child process and returns what it recorded."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "answers.json"
        command = [sys.executable, "-m", "serving.release.answers", str(folder), str(eval_set), str(out)]
        if reverse:
            command.append("--reverse")
        if reference is not None:
            (Path(scratch) / "reference.json").write_text(json.dumps(reference))
            command += ["--score", str(Path(scratch) / "reference.json")]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        # The results are written (in one rename) only once everything is measured, so they stand even when
        # the process then dies in the engine's shutdown, which vLLM's CPU build sometimes does.
        if not out.exists():
            raise EngineRunError(f"running {folder} on {eval_set} failed:\n{done.stderr[-4000:]}")
        found: dict[str, Any] = json.loads(out.read_text())
        found["exit_status"] = done.returncode
    return found


def main(argv: list[str]) -> None:
    folder, eval_set, out = (Path(a) for a in argv[:3])
    reference = json.loads(Path(argv[argv.index("--score") + 1]).read_text()) if "--score" in argv else None
    found = answer(folder, eval_set, reverse="--reverse" in argv, reference=reference)
    scratch = out.with_suffix(".partial")
    scratch.write_text(json.dumps(found))
    scratch.replace(out)
    phase("results written")


if __name__ == "__main__":
    main(sys.argv[1:])
