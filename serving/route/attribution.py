"""Response ids that say who answered, signed, so that any router replica can attribute feedback.

The router runs each engine request under an id it makes here, and vLLM names the response after it
(`chatcmpl-<id>`, `cmpl-<id>`). The id carries the tenant, tier and variant that answered and when,
with an HMAC over them: a replica that never saw the request verifies the id with the shared key (the
rollout controller's secret) and knows whom to count the feedback for, with no shared store. A changed
id fails the HMAC (400), an old one is refused (404), another tenant's is refused (403).

    <base64url(tenant \\0 tier \\0 variant \\0 unix seconds \\0 nonce)>.<base64url(HMAC-SHA256)[:22]>
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from serving.errors import BadRequest, NotFound

RESPONSE_PREFIXES = ("chatcmpl-", "cmpl-")
SIGNATURE_CHARS = 22  # 128 bits of the HMAC, base64url


@dataclass(frozen=True)
class Attribution:
    tenant: str
    tier: str
    variant: str
    at: float


def key_from(secret: bytes) -> bytes:
    """The signing key, derived from the controller's secret (which also keys the sticky split)."""
    return hmac.digest(secret, b"serving response ids v1", "sha256")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign(key: bytes, tenant: str, tier: str, variant: str, at: float | None = None) -> str:
    """A fresh request id for one engine request, attributing its answer."""
    when = int(time.time() if at is None else at)
    payload = b64("\0".join([tenant, tier, variant, str(when), secrets.token_hex(6)]).encode())
    signature = b64(hmac.digest(key, payload.encode(), hashlib.sha256))[:SIGNATURE_CHARS]
    return f"{payload}.{signature}"


def verify(keys: list[bytes], response_id: str, max_age_s: float, now: float | None = None) -> Attribution:
    """The attribution in a response id, if one of `keys` signed it and it is not older than `max_age_s`."""
    request_id = response_id
    for prefix in RESPONSE_PREFIXES:
        request_id = request_id.removeprefix(prefix)
    payload, _, signature = request_id.partition(".")
    # Compared as bytes: compare_digest refuses str with non-ASCII characters (a TypeError, not a mismatch).
    if not any(
        hmac.compare_digest(
            signature.encode(), b64(hmac.digest(key, payload.encode(), hashlib.sha256))[:SIGNATURE_CHARS].encode()
        )
        for key in keys
    ):
        raise BadRequest("response_id is not the id of a response from this server", param="response_id", code="bad_id")
    tenant, tier, variant, when, _nonce = unb64(payload).decode().split("\0")
    age = (time.time() if now is None else now) - int(when)
    if age > max_age_s:
        raise NotFound(
            f"response {response_id!r} is older than {max_age_s:.0f} s; feedback on it is no longer taken",
            param="response_id",
            code="response_expired",
        )
    return Attribution(tenant, tier, variant, float(when))
