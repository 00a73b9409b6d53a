from __future__ import annotations

import math
from pathlib import Path

import pytest

from serving.config import ConfigError, TierConfig, VariantConfig, hash_key, load_config
from serving.errors import Forbidden, NotFound, Unauthorized
from serving.intake.auth import authenticate
from serving.route import routing

REPO = Path(__file__).resolve().parents[2]
VARIANTS = {
    "fp16": VariantConfig(path=Path("/a"), precision="fp16"),
    "int8": VariantConfig(path=Path("/b"), precision="int8"),
    "awq": VariantConfig(path=Path("/c"), precision="awq"),
}
USERS = [f"user-{i}" for i in range(20_000)]


def tier(weight: float) -> TierConfig:
    return TierConfig(baseline="fp16", candidate="int8", weight=weight)


def on_candidate(weight: float) -> set[str]:
    return {u for u in USERS if routing.decide("standard", tier(weight), weight, u, VARIANTS).reason == "candidate"}


@pytest.mark.parametrize("weight", [0.0, 0.1, 1.0, 20.0, 50.0, 99.9, 100.0])
def test_the_observed_split_matches_the_weight(weight: float) -> None:
    share = len(on_candidate(weight)) / len(USERS)
    p = weight / 100
    # Four binomial standard deviations (plus a hair for p in {0, 1}): a chance failure is ~1 in 15,000.
    tolerance = 4 * math.sqrt(p * (1 - p) / len(USERS)) + 1e-9
    assert abs(share - p) <= tolerance, f"weight {weight}: observed {share:.4f}"


def test_assignment_is_sticky_while_the_weight_is_unchanged() -> None:
    first = [routing.decide("standard", tier(30.0), 30.0, u, VARIANTS) for u in USERS[:500]]
    again = [routing.decide("standard", tier(30.0), 30.0, u, VARIANTS) for u in USERS[:500]]
    assert first == again


def test_raising_the_weight_only_moves_users_from_baseline_to_candidate() -> None:
    previous: set[str] = set()
    for weight in (0.0, 5.0, 5.1, 20.0, 50.0, 80.0, 100.0):
        now = on_candidate(weight)
        assert previous <= now, f"someone left the candidate when the weight rose to {weight}"
        previous = now
    assert previous == set(USERS)


def test_tiers_hash_independently() -> None:
    # The same user is not bound to the candidate in every tier at once.
    a = {u for u in USERS[:2000] if routing.bucket("standard", u) < 50_000}
    b = {u for u in USERS[:2000] if routing.bucket("batch", u) < 50_000}
    assert a != b


def test_overrides_pin_a_variant_but_never_a_forbidden_precision() -> None:
    premium = TierConfig(baseline="fp16", forbid=("awq",))
    assert routing.decide("premium", premium, 0.0, "u", VARIANTS, override="int8") == routing.Decision(
        "int8", "override"
    )
    with pytest.raises(Forbidden, match="may not use awq"):
        routing.decide("premium", premium, 0.0, "u", VARIANTS, override="awq")
    with pytest.raises(NotFound, match="unknown variant 'fp8'"):
        routing.decide("premium", premium, 0.0, "u", VARIANTS, override="fp8")


def test_a_tier_without_candidate_always_gets_its_baseline() -> None:
    premium = TierConfig(baseline="fp16", forbid=("awq",))
    assert {routing.decide("premium", premium, 0.0, u, VARIANTS).variant for u in USERS[:1000]} == {"fp16"}


def test_keys_map_to_principals_and_unknown_keys_are_refused() -> None:
    config = load_config(REPO / "deploy" / "demo.yaml")
    admin = authenticate(config, "Bearer demo-admin")
    assert (admin.tier, admin.may_override, admin.key_id) == ("standard", True, hash_key("demo-admin")[:12])
    assert authenticate(config, "bearer demo-batch").tier == "batch"
    for header, message in [(None, "missing API key"), ("Basic abc", "must be 'Bearer"), ("Bearer nope", "unknown")]:
        with pytest.raises(Unauthorized, match=message):
            authenticate(config, header)


def test_config_errors_are_value_errors() -> None:
    assert issubclass(ConfigError, ValueError)
