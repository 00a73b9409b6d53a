"""The router: the only public endpoint. HTTP in, key to tier, routing decision, variant call, answer out.

`RouterCore` holds the logic and the live config (swapped whole on reload, so a request in flight
keeps the config it started with); `create_app` puts the OpenAI-compatible HTTP surface on it. The Ray
Serve ingress deployment that hosts both lives in `serving.deploy.app`; tests can host them with fake variants.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from opentelemetry import trace

from serving.config import Config, variants_differ
from serving.edge import openapi
from serving.errors import Conflict, Forbidden, NotFound, ServingError, TooManyRequests, Unavailable
from serving.intake.admission import KeyQuotas, RateLimit, engine_busy, is_backpressure, token_cost, variant_down
from serving.intake.auth import Principal, authenticate
from serving.intake.limits import HeaderLimits
from serving.intake.protocol import (
    FeedbackRecorded,
    answer_text,
    engine_error,
    may_need_parsing,
    parse_chunk,
    parse_feedback,
    read_json_body,
    read_request,
    sse,
    sse_error,
    usage_of,
    wants_usage,
    with_usage,
)
from serving.metrics import Metrics
from serving.rollout.follower import ControllerLink, Follower
from serving.rollout.signals import FeedbackSignal, RequestSignal
from serving.route import attribution, escalation, routing
from serving.route.drain import CLOSE, Drain, DrainGate
from serving.route.readiness import Readiness
from serving.shadow.shadower import Shadower
from serving.tracing import make_tracer, trace_id_hex
from serving.variants.client import Endpoint, EngineItem, EngineRequest, VariantClient
from serving.variants.load import EngineLoad

logger = logging.getLogger("serving.route.core")

DESCRIBE_TIMEOUT_S = 5.0
# A candidate's call that failed in one of these ways, before any byte went to the client, is answered by
# the tier's baseline instead (a full queue, `engine_overloaded`, is no sign that the candidate is down).
DOWN_CODES = frozenset({"variant_unavailable", "empty_response", "engine_error"})
# How long a candidate that failed so is passed over: its tier's requests go straight to the baseline instead
# of each waiting up to ASSIGN_TIMEOUT_S (serving.variants.client) for a replica that is restarting. The first
# request after it tries the candidate again.
CANDIDATE_DOWN_HOLD_S = 10.0


class RouterCore:
    def __init__(
        self,
        config: Config,
        variants: Mapping[str, VariantClient],
        provenance: Mapping[str, dict[str, Any]] | None = None,
        *,
        metrics: Metrics | None = None,
        tracer: trace.Tracer | None = None,
        controller: ControllerLink | None = None,
    ) -> None:
        self.config = config
        self.variants = dict(variants)
        self.loads = {name: EngineLoad() for name in self.variants}  # primary calls in flight, per variant
        self.provenance = dict(provenance or {})
        self.metrics = metrics or Metrics()  # in memory, unless the deployment passes Ray's export
        self.tracer = tracer or make_tracer(config.observability.otlp_endpoint)
        self.shadower = Shadower(
            self.variants,
            self.metrics,
            max_concurrency=config.shadowing.max_concurrency,
            noise_floor_rate=config.shadowing.noise_floor_rate,
            max_primary_in_flight=config.shadowing.max_primary_in_flight,
            in_flight=self.in_flight,
            tracer=self.tracer,
        )
        # The rollout, as this replica sees it: live weights, signals for the controller, feedback votes.
        self.follower = Follower(controller)
        self.feedback_limit = RateLimit(config.limits.feedback_per_minute)
        self.quotas = KeyQuotas(config.limits)  # requests and tokens per minute, per key
        # From the controller, shared by every router replica: keys the sticky split and signs response ids.
        self.secret: bytes | None = None
        self.local_key = secrets.token_bytes(32)  # signs until the controller's secret arrives
        self.readiness = Readiness()
        self.drain = Drain()  # set on shutdown (serving.route.drain): new requests refused, those in flight counted
        self.engine_facts: dict[str, dict[str, Any]] = {}
        self.shadower.on_compared = self.follower.record
        self.config_version = 0
        self.down_until: dict[str, float] = {}  # candidate -> until when it is passed over (monotonic)
        # From the controller: variants unfit on this machine (serving.engine.verify), out of the rollout, with why.
        self.unfit: dict[str, str] = {}
        self.start_series(config)

    def in_flight(self, variant: str) -> float:
        """Primary requests this router has in flight to a variant's engine: now, or averaged over the last
        second, whichever is more (a burst after a quiet spell is busy at once; answers that end together
        leave the engine idle only for an instant)."""
        load = self.loads.get(variant)
        return max(load.now(), load.recent()) if load is not None else 0.0

    def apply(self, config: Config) -> None:
        """Swaps in a new config. Variants cannot change without a redeploy; that is refused."""
        if variants_differ(self.config, config):
            raise ValueError("the variants changed; that needs a redeploy, not a config apply")
        self.config = config
        self.shadower.max_concurrency = config.shadowing.max_concurrency
        self.shadower.noise_floor_rate = config.shadowing.noise_floor_rate
        self.shadower.max_primary_in_flight = config.shadowing.max_primary_in_flight
        self.feedback_limit.per_minute = config.limits.feedback_per_minute
        self.quotas.configure(config.limits)
        self.start_series(config)

    def start_series(self, config: Config) -> None:
        """Gives each tier's dropped-shadow counters a first sample: a zero is data; an absent series is not.
        Every router exports them from its start, before any traffic (what ServingRouterMetricsAbsent reads)."""
        for name in config.tiers:
            for reason in ("saturated", "failed"):
                self.metrics.shadow_dropped.labels(name, reason).inc(0)

    def signing_keys(self) -> list[bytes]:
        """The key that signs response ids first; ids signed before the controller's secret arrived still verify."""
        shared = [attribution.key_from(self.secret)] if self.secret else []
        return [*shared, self.local_key]

    async def describe_variants(self) -> dict[str, dict[str, Any]]:
        """Each variant's precision, activation dtype, kernels and provenance, as /v1/models shows them."""
        missing = [name for name in self.variants if name not in self.engine_facts]
        if missing:
            found = await asyncio.gather(
                *(asyncio.wait_for(self.variants[n].describe(), DESCRIBE_TIMEOUT_S) for n in missing),
                return_exceptions=True,
            )
            for name, facts in zip(missing, found, strict=True):
                if isinstance(facts, dict):  # an engine still starting is asked again next time
                    self.engine_facts[name] = facts
        described = {}
        for name, v in self.config.variants.items():
            facts = self.engine_facts.get(name, {})
            described[name] = {
                "precision": v.precision,
                "dtype": facts.get("dtype"),
                "dtype_reason": facts.get("dtype_reason"),
                "linear_kernels": facts.get("linear_kernels"),
                "hardware": facts.get("hardware"),
                "verification": facts.get("verification"),
                "unfit": self.unfit.get(name) or facts.get("unfit"),
                "provenance": self.provenance.get(name),
            }
        return described

    async def admin_rollout(self, request: Request) -> JSONResponse:
        principal = authenticate(self.config, request.headers.get("authorization"))
        if not principal.admin:
            raise Forbidden("this API key may not read the rollout state", code="admin_only")
        status = await self.follower.status()
        status["router"]["config_version"] = self.config_version
        return JSONResponse(status)

    async def handle(self, endpoint: Endpoint, request: Request) -> Response:
        """An OpenAI request over HTTP: who asks, what they ask, then `serve`."""
        with self.tracer.start_as_current_span(f"router {endpoint}") as span:
            config = self.config  # one snapshot for the whole request
            principal = authenticate(config, request.headers.get("authorization"))
            body = await read_json_body(request, config.limits.max_body_bytes)
            model = body.get("model")
            if model != config.model:
                raise NotFound(
                    f"the model {model!r} does not exist; this server serves {config.model!r}",
                    param="model",
                    code="model_not_found",
                )
            incoming = read_request(endpoint, body, config.limits)
            parsed = incoming.request
            sticky = str(parsed.user or request.headers.get("x-user-id") or principal.key_id)
            override = request.headers.get("x-variant")
            response = await self.serve(
                config, principal, endpoint, parsed, sticky, override, span, prompt_chars=incoming.prompt_chars
            )
            response.headers["x-trace-id"] = trace_id_hex(span)
            return response

    async def serve(
        self,
        config: Config,
        principal: Principal,
        endpoint: Endpoint,
        parsed: EngineRequest,
        sticky: str,
        override: str | None,
        span: trace.Span,
        *,
        prompt_chars: int | None = None,
    ) -> Response:
        """Routes a parsed, bounded request of an authenticated principal to a variant, and answers.
        `prompt_chars`: the prompt's length as measured on the raw body, for the token quota."""
        tier = config.tiers[principal.tier]
        if override is not None and not principal.may_override:
            raise Forbidden("this API key may not pin a variant (x-variant)", param="x-variant", code="override_denied")
        if override in self.unfit:
            raise Unavailable(f"variant {override} is {self.unfit[override]}", param="x-variant", code="variant_unfit")
        self.quotas.admit(principal.key_id, token_cost(endpoint, parsed, prompt_chars))
        with self.tracer.start_as_current_span("route") as route_span:
            decision = routing.decide(
                principal.tier,
                tier,
                self.follower.weight(config, principal.tier),
                sticky,
                config.variants,
                override,
                self.secret,
            )
            route_span.set_attributes({"tier": principal.tier, "variant": decision.variant, "reason": decision.reason})
        span.set_attributes({"tenant": principal.tenant, "tier": principal.tier, "variant": decision.variant})
        # The engine names its response after this id: it carries, signed, who answered (for feedback).
        parsed.request_id = attribution.sign(self.signing_keys()[0], principal.tenant, principal.tier, decision.variant)
        if decision.reason == "override":
            self.metrics.overrides.labels(decision.variant, principal.tier, "routing").inc()
            logger.info(
                "override: tenant %s pinned variant %s on tier %s", principal.tenant, decision.variant, principal.tier
            )
        shadow = None
        if tier.shadow is not None and parsed.n in (None, 1):
            shadow = self.shadower.pick_target(decision.variant, tier.shadow.target, tier.shadow.rate)
            if shadow is not None and shadow[0] in self.unfit:
                shadow = None
        escalate = escalation.plan(config, tier, decision, endpoint, parsed)
        passed_over = decision.variant in self.unfit or self.down_until.get(decision.variant, 0.0) > time.monotonic()
        if decision.reason == "candidate" and passed_over:
            return await self.fall_back(config, principal, endpoint, parsed, decision.variant)
        call = Call(self, principal, decision.variant, endpoint, parsed, shadow, escalate)
        with self.tracer.start_as_current_span("variant call") as call_span:
            call_span.set_attribute("variant", decision.variant)
            try:
                return await call.start()
            except Unavailable as exc:
                if decision.reason != "candidate" or exc.code not in DOWN_CODES:
                    raise  # a baseline that is down, or a pinned variant, is a clear 503
                self.down_until[decision.variant] = time.monotonic() + CANDIDATE_DOWN_HOLD_S
        return await self.fall_back(config, principal, endpoint, parsed, decision.variant)

    async def fall_back(
        self, config: Config, principal: Principal, endpoint: Endpoint, parsed: EngineRequest, candidate: str
    ) -> Response:
        """Answers on the tier's baseline a request routed to its candidate while that is down, counted as an
        override of kind "fallback" (on the candidate). Never onto a precision the tier forbids (the config
        refuses such a baseline; checked again here because it is the tier's promise)."""
        tier = config.tiers[principal.tier]
        baseline = tier.baseline
        if config.variants[baseline].precision in tier.forbid:
            raise variant_down(candidate)
        self.metrics.overrides.labels(candidate, principal.tier, "fallback").inc()
        logger.warning("fallback: %s is down; tier %s's request is answered by %s", candidate, principal.tier, baseline)
        # Signed anew, so feedback on the answer goes to the variant that wrote it.
        parsed.request_id = attribution.sign(self.signing_keys()[0], principal.tenant, principal.tier, baseline)
        call = Call(self, principal, baseline, endpoint, parsed, None)
        with self.tracer.start_as_current_span("variant call") as call_span:
            call_span.set_attributes({"variant": baseline, "fallback_from": candidate})
            response = await call.start()
        response.headers["x-fallback-from"] = candidate
        return response

    async def feedback(self, request: Request) -> JSONResponse:
        config = self.config
        principal = authenticate(config, request.headers.get("authorization"))
        vote = parse_feedback(await read_json_body(request, config.limits.max_body_bytes))
        response_id, overridden, label = vote.response_id, vote.overridden, vote.label
        answered = attribution.verify(self.signing_keys(), response_id, config.limits.feedback_max_age_s)
        if answered.tenant != principal.tenant:
            raise Forbidden("that response was given to another tenant", param="response_id", code="other_tenant")
        wait_s = self.feedback_limit.take(principal.key_id)
        if wait_s:
            raise TooManyRequests(
                f"at most {config.limits.feedback_per_minute} feedback posts per minute for this key",
                code="feedback_rate_limited",
                headers={"retry-after": str(max(1, round(wait_s)))},
            )
        # One vote per response, whichever replica takes it: repeats cannot trip, or hide, a rollback.
        if not await self.follower.take_vote(response_id):
            raise Conflict("feedback on this response was already recorded", param="response_id", code="duplicate")
        self.metrics.feedback.labels(answered.variant, answered.tier).inc()
        self.follower.record(FeedbackSignal(answered.tier, answered.variant, overridden, response_id))
        if overridden:
            self.metrics.overrides.labels(answered.variant, answered.tier, "feedback").inc()
            logger.info(
                "feedback: %s on %s (tier %s) overturned, label %r", response_id, answered.variant, answered.tier, label
            )
        recorded = FeedbackRecorded(response_id=response_id, variant=answered.variant, recorded=True)
        return JSONResponse(recorded.model_dump())


class Call:
    """One primary call: measured, remembered for feedback, shadowed once its answer is complete, and
    escalated to full precision when its tier says so and its answer's confidence is low. A re-run on
    full precision is a call of its own, with role "escalation"."""

    def __init__(
        self,
        core: RouterCore,
        principal: Principal,
        variant: str,
        endpoint: Endpoint,
        parsed: EngineRequest,
        shadow: tuple[str, str] | None,
        escalate: escalation.Escalation | None = None,
        role: str = "primary",
    ) -> None:
        self.core, self.principal, self.variant, self.endpoint, self.parsed = core, principal, variant, endpoint, parsed
        self.shadow = shadow
        self.escalation = escalate
        self.role = role
        self.labels = (variant, principal.tier, role)
        self.started = time.monotonic()

    async def start(self) -> Response:
        metrics = self.core.metrics
        headers = {"x-served-variant": self.variant}
        streamed = bool(getattr(self.parsed, "stream", False))
        self.core.loads[self.variant].started(self)
        if self.core.in_flight(self.variant) > self.core.shadower.max_primary_in_flight:
            self.core.shadower.preempt(self.variant)
        try:
            engine_request = self.parsed
            if streamed:
                engine_request = with_usage(self.parsed)
            elif self.escalation is not None:
                engine_request = escalation.with_logprobs(self.endpoint, self.parsed)
            stream = self.core.variants[self.variant].call(self.endpoint, engine_request)
            first = await anext(stream)
        except StopAsyncIteration:
            self.done()
            self.count("error")
            raise Unavailable(f"variant {self.variant} returned nothing", code="empty_response") from None
        except asyncio.CancelledError:  # the client went away: the engine call is cancelled with this task
            self.done()
            raise
        except Exception as exc:
            self.done()
            if is_backpressure(exc):
                self.count("rejected")  # a full queue says nothing of the variant's health
                raise engine_busy(self.variant) from None
            self.count("error")
            logger.warning("variant %s failed: %r", self.variant, exc)
            raise variant_down(self.variant) from None
        error = engine_error(first)
        if error is not None:
            self.done()
            # A request the engine refused (4xx) says nothing of the variant; an engine that failed (5xx) does.
            self.count("rejected" if error.status < 500 else "error")
            raise error
        first_at = time.monotonic()
        if not isinstance(first, str | list):  # a whole, non-streaming response
            self.done()
            usage = first.usage
            text = answer_text(self.endpoint, first)
            self.finish(text, usage.completion_tokens, usage.prompt_tokens, first_at, False)
            if self.escalation is not None:
                confidence = escalation.mean_logprob(self.endpoint, first)
                if not self.escalation.client_wants_logprobs:
                    first = escalation.without_logprobs(first)
                if confidence is not None and confidence < self.escalation.min_mean_logprob:
                    escalated = await self.escalate(confidence)
                    if escalated is not None:
                        return escalated
            return JSONResponse(first.model_dump(mode="json", exclude_none=True), headers=headers)
        # A first token is observable only in a stream.
        metrics.time_to_first_token.labels(*self.labels).observe(first_at - self.started)
        return StreamingResponse(self.relay(first, stream, first_at), media_type="text/event-stream", headers=headers)

    async def escalate(self, confidence: float) -> Response | None:
        """Re-runs the request on the tier's full-precision baseline and answers with that; None (the quantized
        answer stands) when the baseline fails. Its duration, with role "escalation", is the added latency."""
        assert self.escalation is not None
        core, target, tier = self.core, self.escalation.target, self.principal.tier
        logger.info(
            "escalation: %s answered on tier %s with mean token log-prob %.3f; re-run on %s",
            self.variant,
            tier,
            confidence,
            target,
        )
        # Signed anew, so feedback on the answer the client gets goes to the variant that wrote it.
        request_id = attribution.sign(core.signing_keys()[0], self.principal.tenant, tier, target)
        rerun = self.parsed.model_copy(update={"request_id": request_id})
        try:
            response = await Call(core, self.principal, target, self.endpoint, rerun, None, role="escalation").start()
        except ServingError as exc:
            logger.warning("escalation to %s failed (%s); the %s answer stands", target, exc, self.variant)
            return None
        core.metrics.overrides.labels(self.variant, tier, "escalation").inc()
        response.headers["x-escalated"] = "true"
        response.headers["x-escalated-from"] = self.variant
        return response

    async def relay(self, first: EngineItem, rest: AsyncIterator[EngineItem], first_at: float) -> AsyncIterator[str]:
        text: list[str] = []
        usage: dict[str, Any] = {}
        engine_failed = False
        client_wants_usage = wants_usage(self.parsed)
        needs_text = self.shadow is not None  # only a shadow comparison reads the answer's text
        ended = False  # the answer is complete and counted
        try:
            async for packet in sse(first, rest):
                if needs_text or may_need_parsing(packet):
                    kept: list[str] = []
                    for data in packet.split("\n\n"):
                        if not data.strip():
                            continue
                        chunk = parse_chunk(data)
                        if chunk is not None:
                            engine_failed = engine_failed or "error" in chunk  # the engine's own error event
                            closing = usage_of(chunk)
                            if closing is not None:
                                usage = closing
                                if not client_wants_usage:
                                    continue  # asked for by the router, not the client
                            for choice in chunk.get("choices") or []:
                                delta = choice.get("delta") or {}
                                piece = delta.get("content") if self.endpoint == "chat" else choice.get("text")
                                if piece:
                                    text.append(piece)
                        kept.append(f"{data}\n\n")
                    packet = "".join(kept)
                # Counted before the last packet goes out: a client hangs up as soon as it reads [DONE], and
                # the code after a generator's last yield does not run once the response is cancelled.
                if not ended and "data: [DONE]" in packet:
                    ended = True
                    self.complete(engine_failed, "".join(text), usage, first_at)
                if packet:
                    yield packet  # usually as the engine wrote it: parsed only when shadowed or holding usage
        except Exception as exc:  # the replica died or the call broke after the 200 went out
            logger.warning("variant %s failed mid-stream: %r", self.variant, exc)
            if not ended:
                self.count("error")
            failure = Unavailable(f"variant {self.variant} failed during the answer; retry", code="stream_interrupted")
            yield sse_error(failure)
            return
        finally:  # also when the client went away and the stream was closed
            self.done()
            closing = getattr(rest, "aclose", None)
            if closing is not None:
                await closing()  # cancels the engine's generation at once, not when the stream is collected
        if not ended:
            self.complete(engine_failed, "".join(text), usage, first_at)

    def complete(self, engine_failed: bool, text: str, usage: dict[str, Any], first_at: float) -> None:
        """A streamed answer has ended: counted as an error if the engine sent one, else finished."""
        self.done()
        if engine_failed:
            self.count("error")
            return
        self.finish(text, usage.get("completion_tokens"), usage.get("prompt_tokens"), first_at, True)

    def done(self) -> None:
        """The engine has finished with this call (or failed it): no longer in flight."""
        self.core.loads[self.variant].finished(self)

    def finish(
        self, text: str, completion_tokens: int | None, prompt_tokens: int | None, first_at: float, streamed: bool
    ) -> None:
        metrics, now = self.core.metrics, time.monotonic()
        metrics.request_duration.labels(*self.labels).observe(now - self.started)
        if completion_tokens:
            metrics.tokens.labels(self.variant, self.principal.tier, "out").inc(completion_tokens)
        if prompt_tokens:
            metrics.tokens.labels(self.variant, self.principal.tier, "in").inc(prompt_tokens)
        # What the rollout judges: what a precision changes, not what the answer's length does.
        ttft: float | None = None
        tpot: float | None = None
        if streamed:  # a first token is observable only in a stream; the rest is decoding
            ttft = first_at - self.started
            if completion_tokens and completion_tokens > 1 and now > first_at:
                tpot = (now - first_at) / (completion_tokens - 1)
                metrics.time_per_output_token.labels(*self.labels).observe(tpot)
        elif completion_tokens:  # a whole answer: its time per output token, prompt processing included
            tpot = (now - self.started) / completion_tokens
        self.count("ok", ttft, tpot)
        if self.shadow is not None:
            target, pairing = self.shadow
            self.core.shadower.submit(
                self.principal.tier, self.variant, target, pairing, self.endpoint, self.parsed, text
            )

    def count(self, outcome: str, ttft: float | None = None, tpot: float | None = None) -> None:
        self.core.metrics.requests.labels(*self.labels, outcome).inc()
        # A request the engine refused as invalid says nothing of the variant. The rollout judges the answers
        # routing chose: escalation re-runs, the hard cases only, would bias the baseline's.
        if outcome != "rejected" and self.role == "primary":
            latency = time.monotonic() - self.started
            signal = RequestSignal(self.principal.tier, self.variant, outcome == "ok", latency, ttft, tpot)
            self.core.follower.record(signal)


Hook = Callable[[], Awaitable[None]]


def create_app(core_of: Callable[[], RouterCore], startup: list[Hook] | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for hook in startup or []:
            await hook()
        yield

    app = FastAPI(title="precision-serving router", lifespan=lifespan, docs_url=None, redoc_url=None)
    # The handlers read their bodies themselves; the document declares them (serving.edge.openapi).
    documents = openapi.Cached()
    app.openapi = lambda: documents.of(core_of().config)  # type: ignore[method-assign]
    app.add_middleware(HeaderLimits, limits_of=lambda: core_of().config.limits)
    app.add_middleware(DrainGate, drain_of=lambda: core_of().drain)  # outermost: a refusal reads no header

    @app.exception_handler(ServingError)
    async def serving_error(request: Request, exc: ServingError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unexpected error on %s", request.url.path, exc_info=exc)
        failure = ServingError("internal error; it has been logged", code="internal_error")
        return JSONResponse(failure.body(), status_code=500)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await core_of().handle("chat", request)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await core_of().handle("completions", request)

    @app.post("/v1/feedback")
    async def feedback(request: Request) -> JSONResponse:
        return await core_of().feedback(request)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        core = core_of()
        authenticate(core.config, request.headers.get("authorization"))
        # vLLM's own models (they allow extra fields: each variant's precision, dtype and kernels).
        from vllm.entrypoints.serve.engine.protocol import ModelCard, ModelList

        card = ModelCard(
            id=core.config.model, created=0, owned_by="precision-serving", variants=await core.describe_variants()
        )
        return JSONResponse(ModelList(data=[card]).model_dump(mode="json", exclude_none=True))

    @app.get("/admin/rollout", include_in_schema=False)  # not public: absent from the OpenAPI document
    async def admin_rollout(request: Request) -> JSONResponse:
        return await core_of().admin_rollout(request)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "config_version": core_of().config_version}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        core = core_of()
        if core.drain.draining:  # a load balancer stops sending here; the answers in flight run on
            return JSONResponse({"ready": False, "variants": {}, "draining": True}, status_code=503, headers=CLOSE)
        # A variant unfit on this machine is out of the rollout, its tiers served by their baselines: the stack
        # is ready without it (a baseline is never unfit: one that cannot serve stops the start).
        fit = {name: client for name, client in core.variants.items() if name not in core.unfit}
        states = await core.readiness.check(fit)
        status = 200 if all(states.values()) else 503
        body = {"ready": status == 200, "variants": states, "unfit": dict(core.unfit)}
        return JSONResponse(body, status_code=status)

    return app
