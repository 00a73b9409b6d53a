"""What routers tell the rollout controller: one typed record per event, declared here, next to the
controller that reads them, and the `Snapshot` the controller answers each router's sync with. They cross
a Ray call (pickled), so a record's fields are its contract; `VERSION` changes whenever a field does, and
the controller counts records of another version as dropped instead of misreading them (routers and
controller may briefly run different code in a redeploy). A new record type needs no new VERSION: a
controller without it cannot unpickle the call that carries it, and its senders treat delivery as best effort.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

VERSION = 2


@dataclass(frozen=True, slots=True)
class RequestSignal:
    """One primary request, answered or failed."""

    tier: str
    variant: str
    ok: bool
    latency_s: float  # end to end; not judged (it grows with the answer's length)
    ttft_s: float | None  # time to first token, where observable (streamed answers)
    tpot_s: float | None  # time per output token
    version: int = VERSION


@dataclass(frozen=True, slots=True)
class ComparisonSignal:
    """One shadow comparison of a primary answer with another variant's (or, for the noise floor, its own)."""

    tier: str
    primary: str
    target: str
    pair: str  # "candidate" | "noise_floor" | ... (serving.shadow.shadower's pair kinds)
    disagree: bool
    drift: float | None
    version: int = VERSION


@dataclass(frozen=True, slots=True)
class FeedbackSignal:
    """A person's verdict on one answer; `response_id` lets the controller count one vote per answer."""

    tier: str
    variant: str
    overridden: bool
    response_id: str
    version: int = VERSION


@dataclass(frozen=True, slots=True)
class ReplicaStarted:
    """An engine replica of `variant` is ready (warmed up) and takes traffic from `started_at` (unix time,
    the replica's clock). Sent by the replica itself (serving.engine.server), not by a router: no router knows
    which replica answered a request, so the controller leaves the variant's latency samples of the next
    `rollback.warmup_exclusion_s` out of the latency checks."""

    variant: str
    replica: str  # Serve's replica id, for the status a person reads
    started_at: float
    version: int = VERSION


@dataclass(frozen=True, slots=True)
class VariantUnfit:
    """A replica of `variant` found it unfit on this machine (serving.engine.verify): it crashed, or answered too far
    from the reference. Sent by the replica itself (serving.engine.server), again every so often; the controller takes
    the variant out of every tier's rollout for as long as it runs (not saved: the next start proves it anew)."""

    variant: str
    replica: str
    reason: str
    at: float
    version: int = VERSION


Signal = RequestSignal | ComparisonSignal | FeedbackSignal | ReplicaStarted


class Snapshot(BaseModel):
    """What the controller hands every router on each sync: the applied config (only when the router's
    version is behind), the live weights, and the secret that keys the sticky split and signs response ids."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int = Field(ge=1, description="the applied config's version")
    config: str | None = Field(description="the applied config as JSON; None when the router already has it")
    weights: dict[str, float] = Field(description="the live canary weight of each tier, percent")
    secret: str = Field(description="hex; shared by every router replica")
    fail_safe: str | None = Field(None, description="why every candidate is held at 0, when the state was damaged")
    unfit: dict[str, str] = Field(
        default_factory=dict, description="variant -> why it is unfit on this machine: out of the rollout"
    )


TYPES: dict[str, type[Signal]] = {
    cls.__name__: cls for cls in (RequestSignal, ComparisonSignal, FeedbackSignal, ReplicaStarted)
}


def to_json(signal: Signal) -> dict[str, Any]:
    """A signal as a JSON object (the controller saves its window with them)."""
    return {"type": type(signal).__name__, **asdict(signal)}


def from_json(data: dict[str, Any]) -> Signal:
    fields = dict(data)
    return TYPES[fields.pop("type")](**fields)
