"""The router's public API as an OpenAPI document (`GET /openapi.json`), honest enough to fuzz against.

The handlers read the raw body themselves (a size limit before any parse, the prompt's length before
validation), so FastAPI cannot infer the request bodies: this module declares them, from the same models
the router validates with (vLLM's OpenAI request models, `serving.intake.protocol.Feedback`), narrowed to what
this server accepts under its live config: the one model it serves, the limits of `serving.intake.limits` as
bounds, the fields only the server may set removed, the roles the OpenAI API allows. Every error status a
client can get is declared with the one OpenAI error body (`serving.errors`). The admin endpoint is left out.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel, Field
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from serving import __version__
from serving.config import Config, LimitsConfig
from serving.intake.limits import SERVER_ONLY
from serving.intake.protocol import ROLES, Feedback, FeedbackRecorded

API_STATUSES = {
    401: "no API key, or an unknown one",
    431: "too many request headers, or too many bytes in them",
    500: "an unexpected failure of the router; it has been logged",
}
COMPLETION_STATUSES = {
    **API_STATUSES,
    400: "the body is malformed or over a limit (`serving.intake.limits`), or the engine refused the request",
    403: "this key may not pin a variant (x-variant), or the tier forbids that variant's precision",
    404: "not the model this server serves, or an unknown variant in x-variant",
    413: "the request body is over the size limit",
    429: "this key is over its requests or tokens per minute (Retry-After says when to come back)",
    503: "the variant is at capacity (Retry-After) or unavailable, or the server is shutting down "
    "(`shutting_down`, Retry-After); retry shortly",
}
FEEDBACK_STATUSES = {
    **API_STATUSES,
    400: "the body is malformed, or the response id is not one this server signed",
    403: "that response was given to another tenant",
    404: "the response is older than limits.feedback_max_age_s",
    409: "feedback on this response was already recorded",
    413: "the request body is over the size limit",
    429: "this key is over its feedback posts per minute (Retry-After)",
}
STICKY_HEADERS = [
    {
        "name": "x-user-id",
        "in": "header",
        "required": False,
        "description": "the user the canary split keeps sticky when the body has no `user`",
        "schema": {"type": "string"},
    },
    {
        "name": "x-variant",
        "in": "header",
        "required": False,
        "description": "pins a variant by name; only for keys with may_override",
        "schema": {"type": "string"},
    },
]

# Under OpenAPI 3.1 the schema of an event stream describes one event.
SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "type": "string",
            "description": "a JSON chunk of the answer (OpenAI's chunk shape), an error body in the OpenAI shape "
            "when the answer breaks off, or `[DONE]`, the last event",
        }
    },
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = Field(description="the request field at fault, if one is")
    code: str | None = Field(description="a stable, machine-readable reason")


class ErrorBody(BaseModel):
    """Every error the router answers: the OpenAI API's shape."""

    error: ErrorDetail


class Health(BaseModel):
    status: str
    config_version: int


class Ready(BaseModel):
    ready: bool
    variants: dict[str, bool] = Field(description="whether each variant generated a token in time")
    draining: bool = Field(False, description="the server is shutting down: it takes no new requests")


def document(config: Config) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the public endpoints, under this config."""
    from ray.serve.llm.openai_api_models import (
        ChatCompletionRequest,
        ChatCompletionResponse,
        CompletionRequest,
        CompletionResponse,
    )
    from vllm.entrypoints.serve.engine.protocol import ModelList

    models: list[tuple[type[BaseModel], JsonSchemaMode]] = [
        (ChatCompletionRequest, "validation"),
        (CompletionRequest, "validation"),
        (Feedback, "validation"),
        (ChatCompletionResponse, "serialization"),
        (CompletionResponse, "serialization"),
        (ModelList, "serialization"),
        (FeedbackRecorded, "serialization"),
        (ErrorBody, "serialization"),
        (Health, "serialization"),
        (Ready, "serialization"),
    ]
    refs, found = models_json_schema(models, ref_template="#/components/schemas/{model}")
    schemas: dict[str, Any] = found["$defs"]

    def ref(model: type[BaseModel], mode: JsonSchemaMode = "serialization") -> dict[str, Any]:
        return dict(refs[(model, mode)])

    def name(model: type[BaseModel], mode: JsonSchemaMode) -> str:
        return str(refs[(model, mode)]["$ref"]).rsplit("/", 1)[-1]

    bound_chat(schemas[name(ChatCompletionRequest, "validation")], schemas, config)
    bound_completion(schemas[name(CompletionRequest, "validation")], config)

    def errors(statuses: dict[int, str]) -> dict[str, Any]:
        declared = {
            str(status): {"description": why, "content": json_body(ref(ErrorBody))}
            for status, why in sorted(statuses.items())
        }
        for status, required in ((429, True), (503, False)):  # 503 says when to retry when an engine is full
            if status in statuses:
                declared[str(status)]["headers"] = {"retry-after": header("seconds to wait", required, "integer")}
        return declared

    def completion(summary: str, request: type[BaseModel], response: type[BaseModel]) -> dict[str, Any]:
        return {
            "post": {
                "summary": summary,
                "security": [{"bearer": []}],
                "parameters": STICKY_HEADERS,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": ref(request, "validation")}},
                },
                "responses": {
                    "200": {
                        "description": "the answer; with `stream: true`, server-sent events ending in `data: [DONE]`",
                        "headers": {
                            "x-served-variant": header("the variant that answered", True),
                            "x-trace-id": header("the request's OpenTelemetry trace id", True),
                        },
                        "content": {
                            "application/json": {"schema": ref(response)},
                            "text/event-stream": {"schema": SSE_EVENT},
                        },
                    },
                    **errors(COMPLETION_STATUSES),
                },
            }
        }

    def probe(summary: str, model: type[BaseModel], statuses: dict[int, str]) -> dict[str, Any]:
        answers = {str(s): {"description": why, "content": json_body(ref(model))} for s, why in statuses.items()}
        return {"get": {"summary": summary, "responses": {**answers, **errors({431: API_STATUSES[431]})}}}

    return {
        "openapi": "3.1.0",
        "info": {"title": "precision-serving router", "version": __version__},
        "paths": {
            "/v1/chat/completions": completion("a chat completion", ChatCompletionRequest, ChatCompletionResponse),
            "/v1/completions": completion("a text completion", CompletionRequest, CompletionResponse),
            "/v1/models": {
                "get": {
                    "summary": "the served model, with each variant's precision, dtype, kernels and provenance",
                    "security": [{"bearer": []}],
                    "responses": {
                        "200": {
                            "description": "the model list",
                            "content": {"application/json": {"schema": ref(ModelList)}},
                        },
                        **errors(API_STATUSES),
                    },
                }
            },
            "/v1/feedback": {
                "post": {
                    "summary": "a person's verdict on one answer (its response id), for the rollout's override rate",
                    "security": [{"bearer": []}],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": ref(Feedback, "validation")}},
                    },
                    "responses": {
                        "200": {
                            "description": "recorded",
                            "content": {"application/json": {"schema": ref(FeedbackRecorded)}},
                        },
                        **errors(FEEDBACK_STATUSES),
                    },
                }
            },
            "/health": probe("liveness: the router answers", Health, {200: "alive"}),
            "/ready": probe(
                "readiness: every variant generates a token",
                Ready,
                {200: "ready", 503: "a variant is not, or the server is shutting down"},
            ),
        },
        "components": {"schemas": schemas, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


def header(description: str, required: bool, kind: str = "string") -> dict[str, Any]:
    return {"description": description, "required": required, "schema": {"type": kind}}


def json_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def bound_common(request: dict[str, Any], config: Config) -> None:
    """What both request bodies share: the served model, required; the limits; no server-only fields."""
    limits: LimitsConfig = config.limits
    props: dict[str, Any] = request["properties"]
    props["model"] = {"type": "string", "enum": [config.model], "description": "the model this server serves"}
    request["required"] = sorted({*request.get("required", []), "model"})
    for field in SERVER_ONLY:
        props.pop(field, None)
    bound(props, "n", 1, limits.max_n)
    for field in ("max_tokens", "max_completion_tokens"):
        bound(props, field, 1, limits.max_tokens)
    props["max_tokens"]["default"] = limits.default_max_tokens  # when neither is set
    bound(props, "min_tokens", 0, limits.max_tokens)
    for field in ("logprobs", "top_logprobs", "prompt_logprobs"):
        bound(props, field, 0, limits.max_logprobs)
    for field in ("stop", "stop_token_ids", "bad_words"):
        at_most_items(props, field, limits.max_stop)
    for field in ("allowed_token_ids", "logprob_token_ids"):
        at_most_items(props, field, limits.max_token_ids)
    for arm in arms(props.get("logit_bias")):
        if arm.get("type") == "object":
            arm["maxProperties"] = limits.max_token_ids


def bound_chat(request: dict[str, Any], schemas: dict[str, Any], config: Config) -> None:
    bound_common(request, config)
    messages = request["properties"]["messages"]
    messages["minItems"] = 1
    # Every message needs a role (`serving.intake.protocol.check_roles`), and vLLM's catch-all message type, which
    # takes any role, takes the OpenAI API's only here.
    kinds = []
    for arm in arms(messages["items"]):
        message = schemas[arm["$ref"].rsplit("/", 1)[-1]]
        role = message.get("properties", {}).get("role")
        if role is None:  # vLLM's harmony `Message` (its role under `author`): refused here, so not offered
            continue
        kinds.append(arm)
        message["required"] = sorted({*message.get("required", []), "role"})
        if "anyOf" in role:  # a nullable role: not null here
            role["anyOf"] = [a for a in role["anyOf"] if a.get("type") != "null"]
    messages["items"] = {"anyOf": kinds}
    custom = schemas.get("CustomChatCompletionMessageParam", {}).get("properties", {})
    if "role" in custom:
        custom["role"] = {"type": "string", "enum": sorted(ROLES)}


def bound_completion(request: dict[str, Any], config: Config) -> None:
    bound_common(request, config)
    prompt = request["properties"]["prompt"]
    # A prompt is required and not empty (prompt_embeds, the alternative, is server-only).
    prompt["anyOf"] = [arm for arm in arms(prompt) if arm.get("type") != "null"]
    for arm in prompt["anyOf"]:
        if arm.get("type") == "string":
            arm["minLength"], arm["maxLength"] = 1, config.limits.max_prompt_chars
        elif arm.get("type") == "array":
            arm["minItems"] = 1
            if arm.get("items", {}).get("type") != "integer":  # a batch of prompts; token ids are one prompt
                arm["maxItems"] = config.limits.max_prompts
    prompt.pop("default", None)
    request["required"] = sorted({*request.get("required", []), "prompt"})


def arms(schema: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The alternatives of a field's schema (`anyOf` for optional fields), or the schema itself."""
    if schema is None:
        return []
    return list(schema.get("anyOf", [schema]))


def bound(props: dict[str, Any], field: str, low: int, high: int) -> None:
    for arm in arms(props.get(field)):
        if arm.get("type") == "integer":
            arm["minimum"], arm["maximum"] = max(low, arm.get("minimum", low)), min(high, arm.get("maximum", high))


def at_most_items(props: dict[str, Any], field: str, limit: int) -> None:
    for arm in arms(props.get(field)):
        if arm.get("type") == "array":
            arm["maxItems"] = min(limit, arm.get("maxItems", limit))


class Cached:
    """The document of the config in force, made again only when a new config is applied."""

    def __init__(self) -> None:
        self.config: Config | None = None
        self.document: dict[str, Any] = {}

    def of(self, config: Config) -> dict[str, Any]:
        if config is not self.config:
            self.config, self.document = config, document(config)
        return copy.deepcopy(self.document)
