"""The router: the only public endpoint. HTTP in, key to tier, routing decision, variant call, answer out.

`RouterCore` holds the logic and the live config (swapped whole on reload, so a request in flight
keeps the config it started with); `create_app` puts the OpenAI-compatible HTTP surface on it. The Ray
Serve ingress deployment that hosts both lives in `serving.app`; tests can host them with fake variants.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from serving import routing
from serving.auth import Principal, authenticate
from serving.config import Config
from serving.errors import BadRequest, Forbidden, NotFound, PayloadTooLarge, ServingError, Unavailable
from serving.variants import Kind, VariantClient

logger = logging.getLogger("serving.router")


class RouterCore:
    def __init__(
        self,
        config: Config,
        variants: Mapping[str, VariantClient],
        provenance: Mapping[str, dict[str, Any]] | None = None,
    ) -> None:
        self.config = config
        self.variants = dict(variants)
        self.provenance = dict(provenance or {})
        self.overrides = 0

    def apply(self, config: Config) -> None:
        """Swaps in a new config. Variants cannot change without a redeploy; that is refused."""
        if set(config.variants) != set(self.config.variants):
            raise ValueError("the set of variants changed; that needs a redeploy, not a config apply")
        self.config = config

    def live_weight(self, config: Config, tier: str) -> float:
        return config.tiers[tier].weight

    def check_limits(self, config: Config, kind: Kind, body: dict[str, Any]) -> None:
        limits = config.limits
        n = body.get("n")
        if isinstance(n, int) and n > limits.max_n:
            raise BadRequest(f"n is {n}; at most {limits.max_n} is allowed", param="n", code="n_too_large")
        for field in ("max_tokens", "max_completion_tokens"):
            value = body.get(field)
            if isinstance(value, int) and value > limits.max_tokens:
                raise BadRequest(
                    f"{field} is {value}; at most {limits.max_tokens} is allowed", param=field, code="max_tokens"
                )
        if prompt_chars(kind, body) > limits.max_prompt_chars:
            raise BadRequest(
                f"the prompt is longer than {limits.max_prompt_chars} characters",
                param="messages" if kind == "chat" else "prompt",
                code="prompt_too_long",
            )

    async def handle(self, kind: Kind, request: Request) -> Response:
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
        self.check_limits(config, kind, body)
        parsed = parse_request(kind, body)

        tier = config.tiers[principal.tier]
        override = request.headers.get("x-variant")
        if override is not None and not principal.may_override:
            raise Forbidden("this API key may not pin a variant (x-variant)", param="x-variant", code="override_denied")
        sticky = str(body.get("user") or request.headers.get("x-user-id") or principal.key_id)
        decision = routing.decide(
            principal.tier, tier, self.live_weight(config, principal.tier), sticky, config.variants, override
        )
        if decision.reason == "override":
            self.overrides += 1
            logger.info(
                "override: tenant %s pinned variant %s on tier %s", principal.tenant, decision.variant, principal.tier
            )
        headers = {"x-served-variant": decision.variant}
        return await self.call_variant(decision.variant, kind, parsed, headers, principal)

    async def call_variant(
        self, variant: str, kind: Kind, parsed: Any, headers: dict[str, str], principal: Principal
    ) -> Response:
        started = time.monotonic()
        try:
            stream = self.variants[variant].call(kind, parsed)
            first = await anext(stream)
        except StopAsyncIteration:
            raise Unavailable(f"variant {variant} returned nothing", code="empty_response") from None
        except ServingError:
            raise
        except Exception as exc:
            logger.warning("variant %s failed: %r", variant, exc)
            raise Unavailable(f"variant {variant} is unavailable; retry shortly", code="variant_unavailable") from None
        error = engine_error(first)
        if error is not None:
            raise error
        if hasattr(first, "model_dump"):  # a whole, non-streaming response
            logger.debug("%s answered in %.3f s", variant, time.monotonic() - started)
            return JSONResponse(first.model_dump(mode="json", exclude_none=True), headers=headers)
        return StreamingResponse(sse(first, stream), media_type="text/event-stream", headers=headers)


def prompt_chars(kind: Kind, body: dict[str, Any]) -> int:
    if kind == "completions":
        prompt = body.get("prompt")
        return len(prompt) if isinstance(prompt, str) else len(json.dumps(prompt))
    messages = body.get("messages")
    return len(json.dumps(messages)) if messages is not None else 0


async def read_json_body(request: Request, limit: int) -> dict[str, Any]:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the request body is larger than {limit} bytes", code="body_too_large")
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise PayloadTooLarge(f"the request body is larger than {limit} bytes", code="body_too_large")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object", code="invalid_json")
    return body


def parse_request(kind: Kind, body: dict[str, Any]) -> Any:
    """Validates with vLLM's own OpenAI request models (through Ray Serve LLM)."""
    from ray.llm._internal.serve.core.configs.openai_api_models import ChatCompletionRequest, CompletionRequest
    from ray.llm._internal.serve.core.ingress.utils import _sanitize_chat_completion_request

    model = ChatCompletionRequest if kind == "chat" else CompletionRequest
    try:
        parsed = model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise BadRequest(f"{where}: {first['msg']}", param=where or None, code="invalid_parameter") from None
    except ValueError as exc:
        raise BadRequest(str(exc), code="invalid_parameter") from None
    # Pydantic leaves some message fields as lazy iterators that cannot cross a Ray call.
    return _sanitize_chat_completion_request(parsed) if kind == "chat" else parsed


def engine_error(first: Any) -> ServingError | None:
    """An `ErrorResponse` from the engine (e.g. prompt longer than the context) as our typed error."""
    item = first[0] if isinstance(first, list) and first else first
    error = getattr(item, "error", None)
    if error is None or not hasattr(error, "code"):
        return None
    status = int(error.code) if str(error.code).isdigit() else 500
    if 400 <= status < 500:
        failure = BadRequest(error.message, code="engine_rejected")
        return failure
    return Unavailable(f"the engine failed: {error.message}", code="engine_error")


async def sse(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[str]:
    done = False

    def packet(item: Any) -> str:
        nonlocal done
        parts = item if isinstance(item, list) else [item]
        text = "".join(p if isinstance(p, str) else f"data: {p.model_dump_json()}\n\n" for p in parts)
        done = done or "data: [DONE]" in text
        return text

    yield packet(first)
    async for item in rest:
        yield packet(item)
    if not done:
        yield "data: [DONE]\n\n"


Hook = Callable[[], Awaitable[None]]


def create_app(core_of: Callable[[], RouterCore], startup: list[Hook] | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for hook in startup or []:
            await hook()
        yield

    app = FastAPI(title="precision-serving router", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(ServingError)
    async def serving_error(request: Request, exc: ServingError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

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

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        core = core_of()
        authenticate(core.config, request.headers.get("authorization"))
        card = {
            "id": core.config.model,
            "object": "model",
            "created": 0,
            "owned_by": "precision-serving",
            "variants": {
                name: {"precision": v.precision, "provenance": core.provenance.get(name)}
                for name, v in core.config.variants.items()
            },
        }
        return JSONResponse({"object": "list", "data": [card]})

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        core = core_of()
        states = {name: await client.healthy() for name, client in core.variants.items()}
        status = 200 if all(states.values()) else 503
        return JSONResponse({"ready": status == 200, "variants": states}, status_code=status)

    return app
