"""Replicas and Ray Serve autoscaling from the config, for each variant and for the router."""

from __future__ import annotations

from pathlib import Path

import pytest
from ray.serve.config import AutoscalingConfig as RayAutoscalingConfig

from serving.config import AutoscalingConfig, ConfigError, hash_key, parse_config, variants_differ

MINIMAL = """
model: m
variants:
  fp16: {path: a, precision: fp16}
tiers:
  t: {baseline: fp16}
keys:
  - {sha256: KEY_HASH, tenant: t, tier: t}
""".replace("KEY_HASH", hash_key("k"))

SCALED = (
    MINIMAL.replace(
        "{path: a, precision: fp16}",
        "{path: a, precision: fp16, autoscaling: {min_replicas: 1, max_replicas: 4, target_ongoing_requests: 16}}",
    )
    + "router: {replicas: 2}\n"
)


def parse(text: str) -> object:
    return parse_config(text, base_dir=Path("/cfg"))


def test_without_scaling_settings_everything_runs_one_replica_as_before() -> None:
    config = parse_config(MINIMAL, base_dir=Path("/cfg"))
    assert config.variants["fp16"].deployment_options()["num_replicas"] == 1
    assert config.router.deployment_options()["num_replicas"] == 1


def test_replicas_and_autoscaling_come_from_the_config() -> None:
    config = parse_config(SCALED, base_dir=Path("/cfg"))
    assert config.router.deployment_options()["num_replicas"] == 2
    options = config.variants["fp16"].deployment_options()
    assert options["autoscaling_config"]["max_replicas"] == 4
    assert options["autoscaling_config"]["target_ongoing_requests"] == 16


def test_router_replicas_can_be_spread_one_per_node() -> None:
    spread = parse_config(MINIMAL + "router: {replicas: 2, max_replicas_per_node: 1}\n", base_dir=Path("/cfg"))
    assert spread.router.deployment_options()["max_replicas_per_node"] == 1
    # Left out, Ray Serve's own default (no limit) holds.
    assert "max_replicas_per_node" not in parse_config(SCALED, base_dir=Path("/cfg")).router.deployment_options()


def test_every_autoscaling_field_is_one_that_ray_serve_accepts() -> None:
    ours = AutoscalingConfig(min_replicas=0, max_replicas=8, initial_replicas=2, upscale_delay_s=5)
    theirs = RayAutoscalingConfig(**ours.model_dump(exclude_none=True))
    for field, value in ours.model_dump(exclude_none=True).items():
        assert getattr(theirs, field) == value, field
    # Ray's own defaults are ours, so leaving a field out means the same thing in both.
    default = RayAutoscalingConfig()
    for field in ("min_replicas", "max_replicas", "target_ongoing_requests", "upscale_delay_s", "downscale_delay_s"):
        assert getattr(AutoscalingConfig(), field) == getattr(default, field), field


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (MINIMAL + "router: {replicas: 2, autoscaling: {max_replicas: 3}}\n", "set replicas or autoscaling"),
        (MINIMAL + "router: {replicas: 0}\n", "router.replicas: Input should be greater than or equal to 1"),
        (MINIMAL + "router: {autoscaling: {min_replicas: 3, max_replicas: 2}}\n", "min_replicas (3) exceeds"),
        (MINIMAL + "router: {autoscaling: {max_replicas: 2, initial_replicas: 5}}\n", "initial_replicas must lie"),
        (MINIMAL + "router: {autoscaling: {max_replicas: 2, look_back: 3}}\n", "autoscaling.look_back: unknown key"),
    ],
)
def test_bad_scaling_is_refused_with_a_message_naming_it(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse(text)
    assert message in str(refused.value)


def test_a_scaling_change_needs_a_redeploy_not_an_apply() -> None:
    plain = parse_config(MINIMAL, base_dir=Path("/cfg"))
    assert variants_differ(plain, parse_config(SCALED, base_dir=Path("/cfg")))
    assert variants_differ(plain, parse_config(MINIMAL + "router: {replicas: 3}\n", base_dir=Path("/cfg")))
    assert not variants_differ(plain, parse_config(MINIMAL + "router: {replicas: 1}\n", base_dir=Path("/cfg")))
