"""The tiny family, built for real (llmcompressor) and loaded for real (vLLM CPU build)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from serving.engine import hardware
from serving.models import build, family, manifest, probe

pytestmark = pytest.mark.integration

RESULTS = Path(__file__).resolve().parents[2] / "results"

# The scheme class vLLM's compressed-tensors integration picks for each variant's linear layers.
EXPECTED_SCHEME = {"int8": "CompressedTensorsW8A8Int8", "awq": "CompressedTensorsWNA16"}
# int8 takes oneDNN on every x86 CPU (asymmetric activations: STACK.md, quirk 10); awq an ISA ("amx" or "vec").
EXPECTED_KERNEL_PATHS = {"int8": ("onednn",), "awq": ("isa=amx", "isa=vec")}


@pytest.fixture(scope="module")
def reports(tiny_family: Path) -> dict[str, dict[str, Any]]:
    return {v.name: probe.run_probe(tiny_family / v.folder) for v in family.TINY.variants}


def test_every_variant_carries_complete_provenance(tiny_family: Path) -> None:
    base = manifest.read_manifest(tiny_family / "fp16", verify_weights=True)
    assert base["quantization"] is None
    assert base["base_model"]["seed"] == family.SEED
    for variant in family.TINY.quantized:
        found = manifest.read_manifest(tiny_family / variant.folder, verify_weights=True)
        assert found["variant"] == variant.name
        assert found["base_model"]["weights_sha256"] == base["weights_sha256"]
        assert found["quantization"]["method"] == variant.method
        assert found["quantization"]["scheme"] == variant.scheme
        assert found["calibration"]["corpus_sha256"] == family.corpus_sha256()
        assert found["calibration"]["num_samples"] > 0
        assert found["tools"]["llmcompressor"] == "0.14.0.1"
        assert found["built_on"] == base["built_on"] == hardware.host()  # built here, and says so
        assert found["created_at"]


def test_building_twice_from_scratch_gives_identical_weights(tiny_family: Path, tmp_path: Path) -> None:
    # On one machine. Another CPU gives other int8 and awq hashes (GPTQ and AWQ run on that CPU's kernels):
    # its manifests say which machine built them, and no test compares a hash with a constant.
    again = build.build_family(family.TINY, tmp_path)
    first = {v.name: manifest.read_manifest(tiny_family / v.folder)["weights_sha256"] for v in family.TINY.variants}
    second = {name: found["weights_sha256"] for name, found in again.items()}
    assert first == second
    assert len(set(first.values())) == 3  # and the three variants really are three different models


def test_a_built_family_is_not_rebuilt(tiny_family: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build.build_family(family.TINY, tiny_family)
    assert capsys.readouterr().out.count("up to date") == 3


@pytest.mark.parametrize("variant", family.TINY.variants, ids=lambda v: v.name)
def test_engine_reports_the_declared_quantization(
    variant: family.Variant, tiny_family: Path, reports: dict[str, dict[str, Any]]
) -> None:
    declared = manifest.read_manifest(tiny_family / variant.folder)
    report = reports[variant.name]
    assert report["engine_quantization"] == declared["vllm_quantization"]
    # The engine runs the dtype chosen for this machine's hardware, whichever branch that is.
    capabilities = hardware.Capabilities(**{**report["hardware"], "cuda_capability": None})
    expected = hardware.choose_dtype("float16", capabilities)
    assert report["engine_dtype"] == report["dtype_choice"]["dtype"] == expected.dtype
    schemes = {kernel.split("/")[0] for kernel in report["linear_kernels"]}
    compressed = [s for s in schemes if s.startswith("CompressedTensorsW")]
    if variant.is_base:
        assert compressed == []
        assert "UnquantizedLinearMethod" in schemes
    else:
        assert compressed == [EXPECTED_SCHEME[variant.name]]
        # and vLLM names the kernel it took
        (kernel,) = [k for k in report["linear_kernels"] if k.startswith(EXPECTED_SCHEME[variant.name])]
        assert kernel.split("/")[-1] in EXPECTED_KERNEL_PATHS[variant.name], kernel
    assert all(len(ids) == probe.MAX_TOKENS for ids in report["token_ids"])


def test_quantized_variants_really_differ_from_fp16(tiny_family: Path, reports: dict[str, dict[str, Any]]) -> None:
    # Control: greedy decoding of the same variant in a fresh engine agrees with itself exactly,
    # so an agreement below 1.0 below is the precision's doing, not the engine's.
    fp16_again = probe.run_probe(tiny_family / "fp16")
    control = probe.token_agreement(reports["fp16"]["token_ids"], fp16_again["token_ids"])
    agreement = {
        name: probe.token_agreement(reports["fp16"]["token_ids"], reports[name]["token_ids"])
        for name in ("int8", "awq")
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "token_agreement.json").write_text(
        json.dumps({"fp16_vs_fp16": control, **{f"{k}_vs_fp16": v for k, v in agreement.items()}}, indent=2) + "\n"
    )
    print(
        f"token agreement against fp16: control {control:.3f}, int8 {agreement['int8']:.3f}, awq {agreement['awq']:.3f}"
    )
    assert control == 1.0
    assert 0.0 < agreement["int8"] < 1.0
    assert 0.0 <= agreement["awq"] < 1.0
