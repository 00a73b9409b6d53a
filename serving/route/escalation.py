"""Confidence-based escalation: a whole answer of a quantized variant whose mean token log-prob is low is
re-run on the tier's full-precision baseline (README, "Escalation"). Pure functions on the request and the
engine's answer; the router (`serving.route.core.Call`) makes the calls.

The engine reports the log-prob of each answer token only when asked (`logprobs`), so the router asks for
them itself on the requests it may escalate, and takes them out of the answer of a client that did not ask.
Streamed answers are never escalated: their tokens are on the wire before their confidence is known.
"""

from __future__ import annotations

from dataclasses import dataclass

from serving.config import FULL_PRECISIONS, Config, TierConfig
from serving.route.routing import Decision
from serving.variants.client import Endpoint, EngineRequest, WholeAnswer


@dataclass(frozen=True)
class Escalation:
    """How one request may be escalated: to which variant, below which mean token log-prob."""

    target: str
    min_mean_logprob: float
    client_wants_logprobs: bool


def plan(
    config: Config, tier: TierConfig, decision: Decision, endpoint: Endpoint, request: EngineRequest
) -> Escalation | None:
    """The escalation a request gets, if any: a tier with a policy, a whole answer routed (not pinned with
    x-variant: a pin asks for that variant) to a quantized variant, and no `echo` (whose log-probs would
    include the prompt's)."""
    policy = tier.escalation
    if policy is None or decision.reason == "override" or getattr(request, "stream", False):
        return None
    if config.variants[decision.variant].precision in FULL_PRECISIONS or getattr(request, "echo", False):
        return None
    return Escalation(tier.baseline, policy.min_mean_logprob, client_wants_logprobs(endpoint, request))


def client_wants_logprobs(endpoint: Endpoint, request: EngineRequest) -> bool:
    value = getattr(request, "logprobs", None)
    return bool(value) if endpoint == "chat" else value is not None


def with_logprobs(endpoint: Endpoint, request: EngineRequest) -> EngineRequest:
    """The request as the engine gets it: reporting each answer token's log-prob (chat `logprobs: true`,
    completions `logprobs: 1`), unless the client asked for them already."""
    if client_wants_logprobs(endpoint, request):
        return request
    return request.model_copy(update={"logprobs": True if endpoint == "chat" else 1})


def mean_logprob(endpoint: Endpoint, answer: WholeAnswer) -> float | None:
    """The mean token log-prob of the answer's least confident choice; None when no choice has a token."""
    means = []
    for choice in answer.choices:
        logprobs = choice.logprobs
        if logprobs is None:
            continue
        if endpoint == "chat":
            values = [entry.logprob for entry in logprobs.content or []]
        else:
            values = [value for value in logprobs.token_logprobs if value is not None]
        if values:
            means.append(sum(values) / len(values))
    return min(means) if means else None


def without_logprobs(answer: WholeAnswer) -> WholeAnswer:
    """The answer without the log-probs the router asked for on the client's behalf."""
    choices = [choice.model_copy(update={"logprobs": None}) for choice in answer.choices]
    return answer.model_copy(update={"choices": choices})
