from __future__ import annotations

from pathlib import Path

import pytest

from serving.config import ConfigError, hash_key, load_config, parse_config

REPO = Path(__file__).resolve().parents[2]

MINIMAL = """
model: m
variants:
  fp16: {path: a, precision: fp16}
  awq: {path: b, precision: awq}
tiers:
  premium: {baseline: fp16, forbid: [awq]}
  cheap: {baseline: fp16, candidate: awq, weight: 12.5}
keys:
  - {sha256: KEY_HASH, tenant: t, tier: premium}
""".replace("KEY_HASH", hash_key("k"))


def parse(text: str) -> object:
    return parse_config(text, base_dir=Path("/cfg"))


@pytest.mark.parametrize(("file", "family"), [("demo.yaml", "smol"), ("tiny.yaml", "tiny")])
def test_the_demo_configs_are_valid_and_resolve_paths_beside_the_file(file: str, family: str) -> None:
    config = load_config(REPO / "deploy" / file)
    assert config.model == "demo-chat"
    assert config.variants["fp16"].path == REPO / "models" / family / "fp16"
    assert config.tiers["batch"].candidate == "awq"
    assert config.tiers["premium"].forbid == ("awq",)
    hashes = {k.sha256 for k in config.keys}
    assert hash_key("demo-admin") in hashes
    assert [k.may_override for k in config.keys if k.sha256 == hash_key("demo-admin")] == [True]


def test_a_minimal_config_parses() -> None:
    config = parse_config(MINIMAL, base_dir=Path("/cfg"))
    assert config.variants["awq"].path == Path("/cfg/b")
    assert config.tiers["cheap"].weight == 12.5
    assert config.limits.max_n == 4  # safe defaults


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (("tiers:", "tiers:\n  extra: {baseline: fp16, colour: red}"), "tiers.extra.colour: unknown key"),
        (("model: m", "model: m\nmodle: typo"), "modle: unknown key"),
        (("weight: 12.5", "weight: 120"), "tiers.cheap.weight: Input should be less than or equal to 100"),
        (("weight: 12.5", "weight: 12.3456"), "resolution of 0.001 percent"),
        (("candidate: awq, weight: 12.5", "weight: 5"), "has no candidate"),
        (("premium: {baseline: fp16", "premium: {baseline: awq"), "tiers.premium.baseline: variant 'awq' is awq"),
        (("candidate: awq", "candidate: int4"), "tiers.cheap.candidate: unknown variant 'int4'"),
        (("tier: premium}", "tier: gold}"), "keys.0.tier: unknown tier 'gold'"),
        (("precision: awq", "precision: int3"), "variants.awq.precision"),
    ],
)
def test_bad_configs_are_refused_with_a_message_naming_the_key(change: tuple[str, str], named: str) -> None:
    old, new = change
    assert old in MINIMAL
    with pytest.raises(ConfigError) as refused:
        parse(MINIMAL.replace(old, new, 1))
    assert named in str(refused.value)


def test_unreadable_or_non_mapping_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse("model: [unclosed")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        parse("- a list")


def test_a_changed_variant_set_or_model_path_needs_a_redeploy() -> None:
    from serving.config import variants_differ

    config = parse_config(MINIMAL, base_dir=Path("/cfg"))
    assert not variants_differ(
        config, parse_config(MINIMAL.replace("weight: 12.5", "weight: 20"), base_dir=Path("/cfg"))
    )
    assert variants_differ(config, parse_config(MINIMAL.replace("path: b", "path: c"), base_dir=Path("/cfg")))
    assert variants_differ(config, parse_config(MINIMAL, base_dir=Path("/elsewhere")))
