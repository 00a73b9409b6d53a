"""Pure routing: (tier policy, live weight, sticky key, override) -> which variant answers.

The canary split is sticky and monotone: a user's bucket is a hash of (tier, user) in [0, 100000),
keyed with a server secret where there is one (the rollout controller keeps it), so that a client
cannot compute which `user` value lands where;
and the user goes to the candidate when the bucket is below weight x 1000. The same user keeps
their variant while the weight is unchanged, and raising the weight only moves users from baseline
to candidate (their buckets are already below the new bound), never back and forth. Resolution: 0.001 %.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from serving.config import TierConfig, VariantConfig
from serving.errors import Forbidden, NotFound

BUCKETS = 100_000

Reason = Literal["baseline", "candidate", "override"]


@dataclass(frozen=True)
class Decision:
    variant: str
    reason: Reason


def bucket(tier: str, sticky_key: str, secret: bytes | None = None) -> int:
    message = f"{tier}\x00{sticky_key}".encode()
    digest = hmac.digest(secret, message, "sha256") if secret else hashlib.sha256(message).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def decide(
    tier_name: str,
    tier: TierConfig,
    weight: float,
    sticky_key: str,
    variants: Mapping[str, VariantConfig],
    override: str | None = None,
    secret: bytes | None = None,
) -> Decision:
    """Chooses the primary variant. `override` must already be authorised by the caller; the tier's
    forbidden precisions apply to it all the same."""
    if override is not None:
        if override not in variants:
            raise NotFound(f"unknown variant {override!r} in x-variant", param="x-variant", code="variant_not_found")
        if variants[override].precision in tier.forbid:
            raise Forbidden(
                f"tier {tier_name!r} may not use {variants[override].precision} variants",
                param="x-variant",
                code="precision_forbidden",
            )
        return Decision(override, "override")
    if tier.candidate is not None and bucket(tier_name, sticky_key, secret) < round(weight * 1000):
        return Decision(tier.candidate, "candidate")
    return Decision(tier.baseline, "baseline")
