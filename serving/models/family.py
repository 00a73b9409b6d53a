"""The demo model family: what each variant is, and the data everything is built from.

Standard library only (imported by both environments).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

CORPUS_DIR = Path(__file__).parent / "corpus"
BASE_NAME = "demo-tiny-llama"
SEED = 1234

# Every Linear input width must divide by 128 for W4A16 with group size 128 (llmcompressor refuses other widths).
ARCHITECTURE = {
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 2048,
    "max_position_embeddings": 2048,
}


@dataclass(frozen=True)
class Variant:
    name: str  # the variant id used in configs and routing
    folder: str  # folder under the family's output directory
    precision: str  # fp16 | int8 | awq
    method: str | None  # quantization algorithm, None for the full-precision base
    scheme: str | None  # compressed-tensors preset scheme


FP16 = Variant("fp16", "fp16", "fp16", None, None)
INT8 = Variant("int8", "int8-w8a8", "int8", "gptq", "W8A8")
AWQ = Variant("awq", "awq-w4a16", "awq", "awq", "W4A16_ASYM")
VARIANTS = (FP16, INT8, AWQ)
QUANTIZED = (INT8, AWQ)


def variant(name: str) -> Variant:
    for v in VARIANTS:
        if v.name == name:
            return v
    raise KeyError(f"unknown demo variant {name!r}; known: {', '.join(v.name for v in VARIANTS)}")


def corpus_files() -> list[Path]:
    return sorted(CORPUS_DIR.glob("*.txt"))


def corpus_text() -> str:
    """The shipped training and calibration text, in a fixed order."""
    return "\n\n".join(p.read_text(encoding="utf-8") for p in corpus_files())


def corpus_sha256() -> str:
    return hashlib.sha256(corpus_text().encode("utf-8")).hexdigest()
