"""The wire format the router reads and writes: request bodies in (size-limited JSON, validated with
vLLM's own OpenAI request models), engine answers out (whole responses, SSE streams, engine errors).
Shared by the router and the shadow comparison."""

from __future__ import annotations

import json
import typing
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from pydantic import ValidationError
from vllm.exceptions import VLLMValidationError

from serving.errors import BadRequest, PayloadTooLarge, ServingError, Unavailable
from serving.variants import Kind

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


def answer_text(kind: Kind, response: Any) -> str:
    """The text of the first choice of a whole chat or completion response."""
    choice = response.choices[0]
    return str((choice.message.content if kind == "chat" else choice.text) or "")


def wants_usage(request: Any) -> bool:
    """Whether the client asked for the usage chunk that ends a stream."""
    options = getattr(request, "stream_options", None)
    return bool(options is not None and options.include_usage)


def with_usage(request: Any) -> Any:
    """A streamed request as the engine gets it: always asking for the usage chunk at the end, whose token
    counts time per output token is computed from (a chunk can carry several tokens). The router passes
    that chunk on only to a client that asked for it."""
    if wants_usage(request):
        return request
    annotation = type(request).model_fields["stream_options"].annotation
    options_class = next(a for a in typing.get_args(annotation) if a is not type(None))
    return request.model_copy(update={"stream_options": options_class(include_usage=True)})


def usage_of(chunk: dict[str, Any]) -> dict[str, Any] | None:
    """The usage of a stream's closing usage chunk (no choices), else None."""
    usage = chunk.get("usage")
    return usage if isinstance(usage, dict) and not chunk.get("choices") else None


def may_need_parsing(packet: str) -> bool:
    """Whether a packet of SSE events may hold the usage chunk (kept for the metrics, passed on only to a
    client that asked for it) or an engine error. A cheap test on the text: a match that is only a word
    in the answer costs a parse, never a wrong answer."""
    return '"usage"' in packet or '"error"' in packet


def parse_chunk(data: str) -> dict[str, Any] | None:
    payload = data.strip().removeprefix("data:").strip()
    if not payload or payload == "[DONE]":
        return None
    try:
        chunk = json.loads(payload)
    except json.JSONDecodeError:
        return None
    return chunk if isinstance(chunk, dict) else None


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
        if kind == "chat":
            check_roles(parsed.messages)
        # Pydantic leaves some message fields as lazy iterators that cannot cross a Ray call.
        return _sanitize_chat_completion_request(parsed) if kind == "chat" else parsed
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        # `param` names the request's own field; the message has the whole path (which may name a union arm).
        param = str(first["loc"][0]) if first["loc"] else None
        raise BadRequest(f"{where}: {first['msg']}", param=param, code="invalid_parameter") from None
    except VLLMValidationError as exc:
        message = exc.args[0] if exc.args else str(exc)
        raise BadRequest(str(message), param=exc.parameter, code="invalid_parameter") from None
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        # vLLM's model validators run on the client's JSON before its types are checked: a `null` list
        # or a number where an object belongs fails there with a plain Python error. The body is at fault.
        raise BadRequest(f"the request is malformed: {exc}", code="invalid_parameter") from None


def new_request_id() -> str:
    """The id an engine request runs under, and so its response's id. Always the server's: otherwise Ray
    Serve takes the client's `x-request-id` header, and a client would choose the ids feedback refers to."""
    return uuid.uuid4().hex


def check_roles(messages: list[Any]) -> None:
    """vLLM accepts any role (its custom-message type), the OpenAI API only these; and at least one message."""
    if not messages:
        raise BadRequest("messages must hold at least one message", param="messages", code="invalid_parameter")
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else getattr(message, "role", None)
        if role not in ROLES:
            raise BadRequest(
                f"messages[{index}].role is {role!r}; it must be one of {', '.join(sorted(ROLES))}",
                param="messages",
                code="invalid_parameter",
            )


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


def sse_error(error: ServingError) -> str:
    """Ends a stream whose status line already went out: an error event in the OpenAI shape, then done."""
    return f"data: {json.dumps(error.body())}\n\ndata: [DONE]\n\n"
