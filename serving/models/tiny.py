"""Builds the full-precision demo model: a BPE tokenizer trained on the shipped corpus and a
seeded, randomly initialised tiny Llama, saved in float16 with a chat template.

Every step is deterministic: the same seed and corpus give the same tokenizer and the same weights.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from serving.models import family, manifest

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

# Role-tagged turns, each closed by <|end|>; the generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tokenizer(out: Path) -> int:
    """Trains the byte-level BPE tokenizer and saves it with its chat template; returns its vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=family.TINY_ARCHITECTURE["vocab_size"],
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(family.corpus_text().splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
        chat_template=CHAT_TEMPLATE,
        model_max_length=family.TINY_ARCHITECTURE["max_position_embeddings"],
    )
    fast.save_pretrained(out)
    return int(tokenizer.get_vocab_size())


def build_fp16(out: Path) -> dict[str, Any]:
    """Writes the fp16 variant folder (weights, config, tokenizer, manifest) and returns its manifest."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a 4 M-parameter save needs no progress bar
    out.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(out)
    logger.info("tokenizer trained: %d tokens", vocab)

    torch.manual_seed(family.SEED)
    config = LlamaConfig(
        **family.TINY_ARCHITECTURE,
        bos_token_id=SPECIAL_TOKENS.index("<s>"),
        eos_token_id=SPECIAL_TOKENS.index("</s>"),
        pad_token_id=SPECIAL_TOKENS.index("<pad>"),
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(torch.float16).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    model.save_pretrained(out, safe_serialization=True)

    return manifest.write_manifest(
        out,
        {
            "variant": family.FP16.name,
            "precision": family.FP16.precision,
            "base_model": {
                "name": family.TINY.base_name,
                "architecture": "LlamaForCausalLM",
                "seed": family.SEED,
                "parameters": sum(p.numel() for p in model.parameters()),
                "dtype": "float16",
                "weights_sha256": None,  # this folder is the base: its own hash is `weights_sha256`
            },
            "quantization": None,
            "tokenizer": {"type": "byte-level BPE", "vocab_size": vocab, "trained_on_sha256": family.corpus_sha256()},
            "calibration": None,
            "tools": manifest.tool_versions("torch", "transformers", "tokenizers", "safetensors"),
            "vllm_quantization": None,
        },
    )
