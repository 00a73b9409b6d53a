"""Loads one variant folder in a real vLLM engine and reports what the engine sees: the quantization
it detected, the activation dtype chosen for this hardware (`serving.hardware`, as the served engines
choose it), the kernel behind each kind of linear layer, and greedy completions of a fixed prompt set.

Run as a child process (vLLM spawns its engine process, so this needs its own `__main__`):

    python -m serving.models.probe VARIANT_DIR report.json

`token_agreement` then turns two reports into the offline agreement measure the tests use.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from serving.models import family

MAX_TOKENS = 32
NUM_PROMPTS = 16


def prompts() -> list[str]:
    """The fixed prompt set: the opening words of the corpus paragraphs, in corpus order."""
    paragraphs = [p.strip() for p in family.corpus_text().split("\n\n") if len(p.split()) >= 12]
    step = max(1, len(paragraphs) // NUM_PROMPTS)
    return [" ".join(p.split()[:10]) for p in paragraphs[::step][:NUM_PROMPTS]]


def probe(folder: Path) -> dict[str, Any]:
    from vllm import LLM, SamplingParams

    from serving import hardware
    from serving.kernels import WORKER_EXTENSION, merge
    from serving.models import manifest

    # The same dtype choice the served engines take, from the same capability probe.
    capabilities = hardware.detect()
    precision = manifest.read_manifest(folder)["precision"]
    choice = hardware.choose_dtype(precision, hardware.weights_dtype(folder), capabilities)
    llm = LLM(
        model=str(folder),
        max_model_len=512,
        seed=0,
        enforce_eager=True,
        dtype=choice.dtype,
        worker_extension_cls=WORKER_EXTENSION,
    )
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate(prompts(), params, use_tqdm=False)
    return {
        "folder": str(folder),
        "hardware": capabilities.as_dict(),
        "dtype_choice": {"dtype": choice.dtype, "reason": choice.reason},
        "engine_quantization": llm.llm_engine.model_config.quantization,
        "engine_dtype": str(llm.llm_engine.model_config.dtype).removeprefix("torch."),
        "linear_kernels": merge(llm.collective_rpc("linear_kernels")),
        "token_ids": [list(o.outputs[0].token_ids) for o in outputs],
        "texts": [o.outputs[0].text for o in outputs],
    }


def token_agreement(reference: list[list[int]], candidate: list[list[int]]) -> float:
    """Mean over prompts of the share of positions where the two greedy continuations agree."""
    from serving.compare import token_agreement as pair_agreement

    if len(reference) != len(candidate) or not reference:
        raise ValueError("token agreement needs two non-empty reports over the same prompts")
    return sum(pair_agreement(r, c) for r, c in zip(reference, candidate, strict=True)) / len(reference)


def run_probe(folder: Path, python: str = sys.executable) -> dict[str, Any]:
    """Runs `probe` in a child process and returns its report."""
    import subprocess
    import tempfile

    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    with tempfile.TemporaryDirectory() as scratch:
        report_path = Path(scratch) / "report.json"
        done = subprocess.run(
            [python, "-m", "serving.models.probe", str(folder), str(report_path)],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0 or not report_path.exists():
            raise RuntimeError(f"probing {folder} failed:\n{done.stderr[-4000:]}")
        report: dict[str, Any] = json.loads(report_path.read_text())
    return report


if __name__ == "__main__":
    Path(sys.argv[2]).write_text(json.dumps(probe(Path(sys.argv[1]))))
