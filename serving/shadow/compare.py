"""Pure scoring of one primary/shadow pair: disagreement, token agreement, teacher-forced score drift.

Score drift: the primary's output tokens are scored under both variants by teacher forcing (each
variant reads prompt + primary output and reports the log-probability of every token of it), and
drift is the mean absolute difference of those log-probabilities per token. It measures how
differently the two variants judge the same answer, whatever the sampling temperature was.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Comparison:
    disagree: bool
    token_agreement: float
    score_drift: float | None  # None when the pair could not be scored (e.g. an empty answer)


def normalize(text: str) -> str:
    """Whitespace and case do not count as disagreement."""
    return " ".join(text.lower().split())


def token_agreement(primary: Sequence[int], shadow: Sequence[int]) -> float:
    """The share of positions where the two token sequences agree; missing positions disagree."""
    length = max(len(primary), len(shadow))
    if length == 0:
        return 1.0
    return sum(1 for a, b in zip(primary, shadow, strict=False) if a == b) / length


def score_drift(primary_logprobs: Sequence[float], shadow_logprobs: Sequence[float]) -> float | None:
    """Mean |delta log-prob| per token of the primary's output, scored by both variants."""
    if not primary_logprobs or len(primary_logprobs) != len(shadow_logprobs):
        return None
    return sum(abs(a - b) for a, b in zip(primary_logprobs, shadow_logprobs, strict=True)) / len(primary_logprobs)


def compare(
    primary_text: str,
    shadow_text: str,
    primary_ids: Sequence[int],
    shadow_ids: Sequence[int],
    primary_logprobs: Sequence[float],
    shadow_logprobs: Sequence[float],
) -> Comparison:
    return Comparison(
        disagree=normalize(primary_text) != normalize(shadow_text),
        token_agreement=token_agreement(primary_ids, shadow_ids),
        score_drift=score_drift(primary_logprobs, shadow_logprobs),
    )
