"""Off-path mirroring: after the primary has answered, a sampled request is replayed to the shadow
target and the pair is compared, without the user's answer waiting for any of it.

Shadows use idle capacity, never a primary's. A comparison is shed, counted with its reason, never queued:
- `busy`: the primary's or the target's engine has more than `max_primary_in_flight` primary requests in
  flight from this router, now or on average over the last second (`serving.variants.load`). The router knows this at
  no cost, and it is what the comparison would compete with (on shared CPU cores, with everything else too);
- `saturated`: `max_concurrency` comparisons are already in flight;
- `preempted`: a comparison already running is cancelled when primaries make one of its engines busy;
- `failed` (afterwards): the comparison itself failed.
Inside the engines, every shadow call runs at `SHADOW_PRIORITY` (vLLM's priority scheduling): a waiting
primary is always scheduled first.

Per pair, four off-path engine calls (all `max_tokens` 1 except the first):
1. the shadow answers the same request (greedy settings as sent, non-streaming, n=1);
2. and 3. the primary's answer is teacher-forced through the primary and the shadow
   (`prompt_logprobs`), giving its tokens and each variant's log-probability of each token;
4. the shadow's answer is tokenized the same way, so token agreement compares like with like.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Mapping
from typing import Any

from opentelemetry import trace

from serving.intake.protocol import answer_text, new_request_id
from serving.metrics import Metrics
from serving.rollout.signals import ComparisonSignal
from serving.shadow import compare
from serving.variants.client import Endpoint, EngineRequest, VariantClient, WholeAnswer

logger = logging.getLogger("serving.shadow.shadower")

SHADOW_PRIORITY = 10  # vLLM schedules lower values first; primaries run at 0


class Shadower:
    def __init__(
        self,
        variants: Mapping[str, VariantClient],
        metrics: Metrics,
        *,
        max_concurrency: int = 4,
        noise_floor_rate: float = 0.1,
        max_primary_in_flight: int = 2,
        in_flight: Callable[[str], float] = lambda variant: 0.0,
        rng: random.Random | None = None,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self.variants = variants
        self.metrics = metrics
        self.max_concurrency = max_concurrency
        self.noise_floor_rate = noise_floor_rate
        self.max_primary_in_flight = max_primary_in_flight
        self.in_flight = in_flight  # primaries in flight to a variant's engine from this router, lately
        self.rng = rng or random.Random()
        self.tracer = tracer or trace.get_tracer("serving.shadow.shadower")
        self.tasks: dict[asyncio.Task[None], tuple[str, str, str]] = {}  # comparison -> (tier, primary, target)
        self.on_compared: Callable[[ComparisonSignal], None] | None = None  # signals for the rollout controller

    def pick_target(self, primary: str, target: str, rate: float) -> tuple[str, str] | None:
        """Whether to shadow this request, and against what: (target, pairing). A share of the sampled
        requests is paired with the primary variant itself, to measure the noise floor."""
        if rate <= 0 or self.rng.random() >= rate:
            return None
        if self.rng.random() < self.noise_floor_rate:
            return primary, "noise_floor"
        if target == primary:
            return None  # the baseline shadowed to itself is only noise floor
        return target, "candidate"

    def submit(
        self,
        tier: str,
        primary: str,
        target: str,
        pairing: str,
        endpoint: Endpoint,
        request: EngineRequest,
        primary_text: str,
    ) -> bool:
        if max(self.in_flight(primary), self.in_flight(target)) > self.max_primary_in_flight:
            self.metrics.shadow_dropped.labels(tier, "busy").inc()
            return False
        if len(self.tasks) >= self.max_concurrency:
            self.metrics.shadow_dropped.labels(tier, "saturated").inc()
            return False
        task = asyncio.get_running_loop().create_task(
            self.run(tier, primary, target, pairing, endpoint, request, primary_text)
        )
        self.tasks[task] = (tier, primary, target)
        task.add_done_callback(self.forget)
        return True

    def forget(self, task: asyncio.Task[None]) -> None:
        self.tasks.pop(task, None)

    def preempt(self, variant: str) -> int:
        """Cancels the comparisons that use this variant's engine, now that primaries keep it busy: a
        comparison started in a quiet moment must not slow the burst that follows. Returns how many."""
        cancelled = 0
        for task, (tier, primary, target) in list(self.tasks.items()):
            if variant in (primary, target) and not task.done() and not task.cancelling():
                task.cancel()  # through the Ray handle, the engine aborts the request too
                self.metrics.shadow_dropped.labels(tier, "preempted").inc()
                cancelled += 1
        return cancelled

    async def run(
        self,
        tier: str,
        primary: str,
        target: str,
        pairing: str,
        endpoint: Endpoint,
        request: EngineRequest,
        primary_text: str,
    ) -> None:
        labels = (tier, primary, target, pairing)
        try:
            # Started inside the request's context, so the span is a child of the request's trace.
            with self.tracer.start_as_current_span("shadow comparison") as span:
                span.set_attributes({"tier": tier, "primary": primary, "shadow": target, "kind": pairing})
                result = await self.compare_pair(endpoint, request, primary, target, primary_text)
                span.set_attributes({"disagree": result.disagree, "token_agreement": result.token_agreement})
        except Exception as exc:
            logger.warning("shadow comparison %s vs %s failed: %r", primary, target, exc)
            self.metrics.shadow_dropped.labels(tier, "failed").inc()
            return
        self.metrics.shadow_comparisons.labels(*labels).inc()
        if result.disagree:
            self.metrics.shadow_disagreements.labels(*labels).inc()
        self.metrics.token_agreement.labels(*labels).observe(result.token_agreement)
        if result.score_drift is not None:
            self.metrics.score_drift.labels(*labels).observe(result.score_drift)
        if self.on_compared is not None:
            self.on_compared(ComparisonSignal(*labels, result.disagree, result.score_drift))

    async def compare_pair(
        self, endpoint: Endpoint, request: EngineRequest, primary: str, target: str, primary_text: str
    ) -> compare.Comparison:
        shadow_answer = await self.answer(target, endpoint, replay(request))
        shadow_text = answer_text(endpoint, shadow_answer)
        prompt_len = int(shadow_answer.usage.prompt_tokens)
        primary_ids, primary_lps = await self.score(primary, endpoint, request, primary_text, prompt_len)
        _, shadow_lps = await self.score(target, endpoint, request, primary_text, prompt_len)
        shadow_ids, _ = await self.score(target, endpoint, request, shadow_text, prompt_len)
        return compare.compare(primary_text, shadow_text, primary_ids, shadow_ids, primary_lps, shadow_lps)

    async def answer(self, variant: str, endpoint: Endpoint, request: EngineRequest) -> WholeAnswer:
        started = asyncio.get_running_loop().time()
        async for item in self.variants[variant].call(endpoint, request):
            self.metrics.request_duration.labels(variant, "-", "shadow").observe(
                asyncio.get_running_loop().time() - started
            )
            if isinstance(item, str | list):
                raise RuntimeError("the shadow engine streamed where a whole answer was asked for")
            if getattr(item, "error", None) is not None and not hasattr(item, "choices"):
                raise RuntimeError(f"the shadow engine refused: {item.error.message}")
            return item
        raise RuntimeError("the shadow engine returned nothing")

    async def score(
        self, variant: str, endpoint: Endpoint, request: EngineRequest, text: str, prompt_len: int
    ) -> tuple[list[int], list[float]]:
        """Teacher-forces `text` after the request's prompt; returns its token ids and log-probs."""
        scored = await self.answer(variant, endpoint, scoring_request(endpoint, request, text))
        # Chat responses carry the prompt's tokens on the response, completions on the choice.
        holder = scored if endpoint == "chat" else scored.choices[0]
        ids = list(holder.prompt_token_ids or [])[prompt_len:]
        positions = list(holder.prompt_logprobs or [])[prompt_len:]
        return ids, [logprob_of(token, position) for token, position in zip(ids, positions, strict=False)]


def logprob_of(token: int, position: Any) -> float:
    """The log-probability vLLM reported for `token` at one prompt position (an object or a dict)."""
    entry = (position or {}).get(token)
    if entry is None:
        raise ValueError(f"no log-probability reported for token {token}")
    value = entry["logprob"] if isinstance(entry, dict) else entry.logprob
    return float(value)


def replay(request: EngineRequest) -> EngineRequest:
    update = {"stream": False, "n": 1, "stream_options": None, "request_id": new_request_id()}
    return request.model_copy(update={**update, "priority": SHADOW_PRIORITY})


def scoring_request(endpoint: Endpoint, request: EngineRequest, text: str) -> EngineRequest:
    common = {
        "stream": False,
        "n": 1,
        "max_tokens": 1,
        "min_tokens": 0,  # the client's min_tokens would exceed max_tokens: the engine refuses that
        "prompt_logprobs": 0,
        "return_token_ids": True,
        "stream_options": None,
        "temperature": 0.0,
        "logprobs": None,
        "request_id": new_request_id(),
        "priority": SHADOW_PRIORITY,
    }
    if endpoint == "chat":
        messages = [*request.messages, {"role": "assistant", "content": text}]
        return request.model_copy(
            update={
                **common,
                "messages": messages,
                "add_generation_prompt": False,
                "continue_final_message": True,
                "max_completion_tokens": None,
                "top_logprobs": None,
                "logprobs": False,
            }
        )
    if not isinstance(request.prompt, str):
        raise ValueError("only a single text prompt can be teacher-forced")
    return request.model_copy(update={**common, "prompt": request.prompt + text, "echo": False})
