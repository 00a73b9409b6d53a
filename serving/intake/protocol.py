"""The wire format the router reads and writes: request bodies in (size-limited JSON, validated with
vLLM's own OpenAI request models), engine answers out (whole responses, SSE streams, engine errors).
Shared by the router and the shadow comparison."""

from __future__ import annotations

import json
import typing
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from pydantic import BaseModel, Field, StrictBool, ValidationError
from vllm.exceptions import VLLMValidationError

from serving.config import LimitsConfig
from serving.errors import BadRequest, PayloadTooLarge, ServingError, Unavailable
from serving.intake import limits
from serving.variants.client import Endpoint, EngineItem, EngineRequest, WholeAnswer

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


def answer_text(endpoint: Endpoint, response: WholeAnswer) -> str:
    """The text of the first choice of a whole chat or completion response."""
    choice = response.choices[0]
    return str((choice.message.content if endpoint == "chat" else choice.text) or "")


def wants_usage(request: EngineRequest) -> bool:
    """Whether the client asked for the usage chunk that ends a stream."""
    options = getattr(request, "stream_options", None)
    return bool(options is not None and options.include_usage)


def with_usage(request: EngineRequest) -> EngineRequest:
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


@dataclass(frozen=True)
class Incoming:
    """A request as the engine gets it, with its prompt's length in characters, measured once on the raw body
    (the length limit and the token quota both read it)."""

    request: EngineRequest
    prompt_chars: int


def read_request(endpoint: Endpoint, body: dict[str, Any], bounds: LimitsConfig) -> Incoming:
    """A request body as the engine gets it: the prompt's length checked on the raw body (an oversized prompt
    costs no parse), parsed, then every field that multiplies the engine's work bounded (`serving.intake.limits`)."""
    chars = limits.check_prompt_length(bounds, endpoint, body)
    parsed = parse_request(endpoint, body)
    limits.enforce(bounds, endpoint, parsed, body)
    return Incoming(parsed, chars)


def parse_request(endpoint: Endpoint, body: dict[str, Any]) -> EngineRequest:
    """Validates with vLLM's own OpenAI request models (as Ray Serve LLM exports them)."""
    from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest

    model = ChatCompletionRequest if endpoint == "chat" else CompletionRequest
    try:
        parsed = model.model_validate(body)
        if endpoint == "chat":
            check_roles(parsed.messages)
            materialize_messages(parsed.messages)
        return parsed
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


def materialize_messages(messages: list[Any]) -> None:
    """Turns the lazy iterators pydantic leaves in messages (an `Iterable[...]` field, such as `content` as a
    list of parts, or an assistant's `tool_calls`, is validated into a one-shot iterator) into lists, so the
    request can be pickled into a Ray call and read more than once (the shadow replays it). Ray Serve LLM's
    ingress does the same with a function it does not export."""
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            messages[index] = message = message.model_dump()
        for field in ("content", "tool_calls"):
            value = message.get(field)
            if value is not None and not isinstance(value, str | list):
                try:
                    message[field] = list(value)
                except (TypeError, ValueError) as exc:
                    raise BadRequest(
                        f"messages[{index}].{field} must be a string or a list",
                        param="messages",
                        code="invalid_parameter",
                    ) from exc


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


def engine_error(first: EngineItem) -> ServingError | None:
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


async def sse(first: EngineItem, rest: AsyncIterator[EngineItem]) -> AsyncIterator[str]:
    done = False

    def packet(item: EngineItem) -> str:
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


class Feedback(BaseModel):
    """The body of POST /v1/feedback: a person's verdict on one answer."""

    response_id: str = Field(min_length=1, description="the `id` of the response the feedback is about")
    overridden: StrictBool = Field(description="whether the person overturned (replaced or rejected) the answer")
    label: str | None = Field(None, description="a free-form tag, logged with an overturned answer")


class FeedbackRecorded(BaseModel):
    """The answer to a feedback post that was recorded."""

    response_id: str
    variant: str = Field(description="the variant that wrote the answer")
    recorded: bool


def parse_feedback(body: dict[str, Any]) -> Feedback:
    try:
        return Feedback.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = str(first["loc"][0]) if first["loc"] else None
        raise BadRequest(f"{param or 'body'}: {first['msg']}", param=param, code="invalid_parameter") from None
