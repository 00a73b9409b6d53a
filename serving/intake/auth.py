"""Bearer key -> principal. Keys are stored as SHA-256 hashes; the lookup compares hashes in constant time."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from serving.config import Config, hash_key
from serving.errors import Unauthorized


@dataclass(frozen=True)
class Principal:
    tenant: str
    tier: str
    may_override: bool
    admin: bool
    key_id: str  # the first characters of the key's hash: safe to log, stable per key


def authenticate(config: Config, authorization: str | None) -> Principal:
    if not authorization:
        raise Unauthorized("missing API key: send it as 'Authorization: Bearer <key>'", code="missing_api_key")
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("the Authorization header must be 'Bearer <key>'", code="invalid_api_key")
    digest = hash_key(key.strip())
    found = None
    for entry in config.keys:  # no early exit: the time taken does not depend on which key matched
        if hmac.compare_digest(entry.sha256, digest):
            found = entry
    if found is None:
        raise Unauthorized("unknown API key", code="invalid_api_key")
    return Principal(
        tenant=found.tenant, tier=found.tier, may_override=found.may_override, admin=found.admin, key_id=digest[:12]
    )
