from __future__ import annotations

import json
from pathlib import Path

import pytest

from serving.models import family, probe, quantize, tiny


def test_variants_are_the_documented_three() -> None:
    assert [v.name for v in family.VARIANTS] == ["fp16", "int8", "awq"]
    assert family.variant("awq").scheme == "W4A16_ASYM"
    with pytest.raises(KeyError, match="unknown demo variant 'fp8'"):
        family.variant("fp8")


def test_every_linear_input_width_suits_group_size_128() -> None:
    # W4A16 with group size 128 refuses other widths.
    assert family.ARCHITECTURE["hidden_size"] % 128 == 0
    assert family.ARCHITECTURE["intermediate_size"] % 128 == 0


def test_corpus_is_shipped_with_its_licence_note() -> None:
    files = family.corpus_files()
    assert len(files) >= 3
    assert sum(len(p.read_text()) for p in files) > 30_000
    assert "public domain" in (family.CORPUS_DIR / "README.md").read_text().lower()
    assert family.corpus_sha256() == family.corpus_sha256()


def test_tokenizer_training_is_deterministic_and_has_a_chat_template(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    vocab_one = tiny.build_tokenizer(tmp_path / "one")
    vocab_two = tiny.build_tokenizer(tmp_path / "two")
    assert vocab_one == vocab_two <= family.ARCHITECTURE["vocab_size"]
    assert (tmp_path / "one" / "tokenizer.json").read_bytes() == (tmp_path / "two" / "tokenizer.json").read_bytes()

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "one")
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello there"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<s><|user|>\nHello there<|end|>\n<|assistant|>\n"
    config = json.loads((tmp_path / "one" / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "</s>"


def test_calibration_blocks_have_equal_length() -> None:
    # Ragged blocks reached the embedding as floats.
    def fake_tokenizer(text: str, add_special_tokens: bool) -> dict[str, list[int]]:
        return {"input_ids": list(range(1000))}

    blocks = quantize.calibration_blocks(fake_tokenizer, seq_len=128, max_samples=64)
    assert len(blocks) == 7
    assert {len(b) for b in blocks} == {128}
    assert quantize.calibration_blocks(fake_tokenizer, seq_len=128, max_samples=3) == blocks[:3]


def test_token_agreement() -> None:
    assert probe.token_agreement([[1, 2, 3, 4]], [[1, 2, 3, 4]]) == 1.0
    assert probe.token_agreement([[1, 2, 3, 4], [5, 6]], [[1, 9, 3, 9], [5, 6]]) == 0.75
    # A shorter continuation counts its missing positions as disagreements.
    assert probe.token_agreement([[1, 2, 3, 4]], [[1, 2]]) == 0.5
    with pytest.raises(ValueError, match="same prompts"):
        probe.token_agreement([[1]], [])


def test_prompt_set_is_fixed() -> None:
    assert probe.prompts() == probe.prompts()
    assert len(probe.prompts()) == probe.NUM_PROMPTS
