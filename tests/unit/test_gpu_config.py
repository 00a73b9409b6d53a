"""deploy/gpu.yaml: the demo's config on GPU nodes with a real model from the hub. Nothing here can
download it or run it on a GPU; these tests check that the file is valid and differs from the demo only
where it must."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from serving.config import ConfigError, hash_key, load_config, parse_config
from serving.ops import cli
from serving.ops.launch import check_variants_exist

REPO = Path(__file__).resolve().parents[2]
GPU = REPO / "deploy" / "gpu.yaml"
DEMO = REPO / "deploy" / "demo.yaml"


def test_serving_check_validates_the_gpu_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check", str(GPU)]) == 0
    out = capsys.readouterr().out
    assert "valid (3 variants, 3 tiers, 4 keys)" in out
    assert "hub Qwen/Qwen2.5-7B-Instruct-AWQ (not checked here)" in out


def test_hub_models_stay_ids_and_need_no_local_folder() -> None:
    config = load_config(GPU)
    assert {name: v.source for name, v in config.variants.items()} == {
        "bf16": "Qwen/Qwen2.5-7B-Instruct",
        "int8": "RedHatAI/Qwen2.5-7B-Instruct-quantized.w8a8",
        "awq": "Qwen/Qwen2.5-7B-Instruct-AWQ",
    }
    assert all(v.path is None and v.gpu for v in config.variants.values())
    check_variants_exist(config)  # nothing local to miss


def test_the_gpu_config_differs_from_the_demo_only_where_it_must() -> None:
    gpu: dict[str, Any] = yaml.safe_load(GPU.read_text())
    demo: dict[str, Any] = yaml.safe_load(DEMO.read_text())
    # The full-precision variant is named for what it is (bf16); every tier refers to it by that name.
    renamed = yaml.safe_load(yaml.safe_dump(demo["tiers"]).replace("fp16", "bf16"))
    assert gpu["tiers"] == renamed
    for section in set(gpu) | set(demo):
        if section not in ("variants", "tiers", "shadowing"):
            assert gpu.get(section) == demo.get(section), section
    # GPU engines batch: shadows are shed only when an engine is far busier than two shared CPU cores allow.
    assert gpu["shadowing"] == {"max_primary_in_flight": 32}
    assert "shadowing" not in demo
    assert set(gpu["variants"]) == {"bf16", "int8", "awq"}
    for name, variant in gpu["variants"].items():
        assert set(variant) == {"hub", "precision", "gpu", "dtype", "max_model_len"}, name
    assert [gpu["variants"][n]["precision"] for n in ("int8", "awq")] == ["int8", "awq"]


MINIMAL = """
model: m
variants:
  full: VARIANT
tiers:
  t: {baseline: full}
keys:
  - {sha256: KEY_HASH, tenant: t, tier: t}
""".replace("KEY_HASH", hash_key("k"))


@pytest.mark.parametrize(
    ("variant", "message"),
    [
        ("{path: a, hub: org/model, precision: bf16}", "give the model's path (a local folder) or hub"),
        ("{precision: bf16}", "give the model's path (a local folder) or hub"),
        ("{hub: just-a-name, precision: bf16}", "variants.full.hub: String should match pattern"),
        ("{hub: org/model/extra, precision: bf16}", "variants.full.hub: String should match pattern"),
        ("{hub: org/model, precision: bf16, gpu: maybe}", "variants.full.gpu"),
    ],
)
def test_a_variant_needs_exactly_one_valid_source(variant: str, message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_config(MINIMAL.replace("VARIANT", variant), base_dir=Path("/cfg"))
    assert message in str(refused.value)


def test_a_local_folder_still_resolves_beside_the_file_and_is_checked(tmp_path: Path) -> None:
    config = parse_config(MINIMAL.replace("VARIANT", "{path: models/x, precision: bf16}"), base_dir=tmp_path)
    assert config.variants["full"].source == str(tmp_path / "models" / "x")
    with pytest.raises(ConfigError, match="have no model at their path: full"):
        check_variants_exist(config)
