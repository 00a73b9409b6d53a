"""What one request may ask of the engines, checked on the request as parsed by vLLM's own models.

Checking the parsed request, not the raw JSON, closes the class of bypasses where a limit only looked at
values that were already integers: pydantic turns `"n": "4000"` and `"n": 4000.0` into `n=4000`, and
the bound applies. Every field that multiplies the engine's work is bounded: choices and beam width
(`n`), output length (`max_tokens`, `max_completion_tokens`, `min_tokens`; a request that sets none gets
`default_max_tokens`, where the engine would allow the whole context), log-prob counts, prompts per
batched completion, stop sequences and token-id lists. Fields that only the server may set are refused.
The prompt's length is checked on the raw body, before parsing, so an oversized prompt costs no parse.
Headers are counted and measured before anything else reads them (`HeaderLimits`), for every endpoint.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from serving.config import LimitsConfig
from serving.errors import BadRequest, HeadersTooLarge
from serving.variants.client import Endpoint, EngineRequest

# vLLM's extension fields that a client must not set, and why.
SERVER_ONLY = {
    "kv_transfer_params": "it hands the engine cached state in place of the prompt",
    "ec_transfer_params": "it hands the engine cached encoder state",
    "vllm_xargs": "it passes arbitrary arguments to the engine",
    "request_id": "the server names requests",
    "priority": "the server schedules requests",
    "prompt_embeds": "the server does not load tensors sent by clients",
    "chat_template": "the chat template is server configuration",
}


def prompt_chars(endpoint: Endpoint, body: dict[str, Any]) -> int:
    """The prompt's length in characters, read from the raw body (a list prompt counts as its JSON, with
    non-ASCII characters as themselves, not as 6-character escapes)."""
    if endpoint == "completions":
        prompt = body.get("prompt")
        return len(prompt) if isinstance(prompt, str) else len(json.dumps(prompt, ensure_ascii=False))
    messages = body.get("messages")
    return len(json.dumps(messages, ensure_ascii=False)) if messages is not None else 0


def check_prompt_length(limits: LimitsConfig, endpoint: Endpoint, body: dict[str, Any]) -> int:
    """Returns the prompt's length, measured once: the token quota reuses it (`admission.token_cost`)."""
    chars = prompt_chars(endpoint, body)
    if chars > limits.max_prompt_chars:
        raise BadRequest(
            f"the prompt is longer than {limits.max_prompt_chars} characters",
            param="messages" if endpoint == "chat" else "prompt",
            code="prompt_too_long",
        )
    return chars


def enforce(limits: LimitsConfig, endpoint: Endpoint, request: EngineRequest, body: dict[str, Any]) -> None:
    """Raises `BadRequest` naming the first field over its limit; sets the default output length when the
    client's `body` asked for none."""
    for field, why in SERVER_ONLY.items():
        if field in request.model_fields_set and getattr(request, field, None) is not None:
            raise BadRequest(f"{field} may not be set by clients: {why}", param=field, code="field_not_allowed")
    # Lower bounds too: vLLM reads -1 log-probs as "the whole vocabulary", and n or an output length
    # below 1 is nonsense the OpenAI API refuses.
    at_least(request.n, 1, "n")
    at_most(request.n or 1, limits.max_n, "n", code="n_too_large")
    lengths = ("max_tokens", "max_completion_tokens", "min_tokens")
    # What the client asked for, read from its body: vLLM's validators fill in their own default (16 for
    # completions, even over an explicit null), which is not the client's ask and not this server's default.
    asked = {field for field in lengths if body.get(field) is not None}
    for field in lengths:
        at_least(getattr(request, field, None), 0 if field == "min_tokens" else 1, field)
        if field in asked:
            at_most(getattr(request, field, None), limits.max_tokens, field, code="max_tokens")
    if not asked & {"max_tokens", "max_completion_tokens"}:
        request.max_tokens = limits.default_max_tokens
    for field in ("logprobs", "top_logprobs", "prompt_logprobs"):
        value = getattr(request, field, None)
        if isinstance(value, int) and not isinstance(value, bool):  # chat's `logprobs` is a switch
            at_least(value, 0, field)
            at_most(value, limits.max_logprobs, field)
    if endpoint == "completions":
        at_most(prompt_count(request.prompt), limits.max_prompts, "prompt", what="prompts")
    stop = request.stop
    at_most(len([stop] if isinstance(stop, str) else stop or []), limits.max_stop, "stop", what="stop sequences")
    for field in ("stop_token_ids", "bad_words"):
        at_most(len(getattr(request, field, None) or []), limits.max_stop, field, what="entries")
    for field in ("logit_bias", "allowed_token_ids", "logprob_token_ids"):
        at_most(len(getattr(request, field, None) or []), limits.max_token_ids, field, what="entries")


def at_least(value: int | None, bound: int, field: str) -> None:
    if value is not None and value < bound:
        raise BadRequest(f"{field} is {value}; it must be at least {bound}", param=field, code="invalid_parameter")


def at_most(value: int | None, limit: int, field: str, *, what: str = "", code: str = "over_limit") -> None:
    if value is not None and value > limit:
        counted = f"{value} {what}" if what else f"{field} is {value}"
        raise BadRequest(f"{counted}; at most {limit} allowed", param=field, code=code)


def prompt_count(prompt: object) -> int:
    """Prompts in a completions request: a string or a list of token ids is one; a list of those, many."""
    if prompt is None or isinstance(prompt, str):
        return 1
    if isinstance(prompt, list) and prompt and all(isinstance(x, int) for x in prompt):
        return 1
    return len(prompt) if isinstance(prompt, list) else 1


def check_headers(limits: LimitsConfig, headers: list[tuple[bytes, bytes]]) -> None:
    """Raises `HeadersTooLarge` (431) for too many header lines, or too many bytes in them all."""
    if len(headers) > limits.max_headers:
        raise HeadersTooLarge(
            f"the request has {len(headers)} headers; at most {limits.max_headers} allowed", code="too_many_headers"
        )
    size = sum(len(name) + len(value) for name, value in headers)
    if size > limits.max_header_bytes:
        raise HeadersTooLarge(
            f"the request's headers hold {size} bytes; at most {limits.max_header_bytes} allowed",
            code="headers_too_large",
        )


class HeaderLimits:
    """ASGI middleware: refuses a request whose headers are over the limits before any handler runs.
    The HTTP server in front (Ray Serve's proxy) parses any number of them."""

    def __init__(self, app: ASGIApp, limits_of: Callable[[], LimitsConfig]) -> None:
        self.app = app
        self.limits_of = limits_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            try:
                check_headers(self.limits_of(), scope["headers"])
            except HeadersTooLarge as exc:
                await JSONResponse(exc.body(), status_code=exc.status, headers={"connection": "close"})(
                    scope, receive, send
                )
                return
        await self.app(scope, receive, send)
