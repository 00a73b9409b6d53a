"""The router's OpenAPI document (serving/edge/openapi.py): every public endpoint with its real request body, the
live config's limits as bounds, and every error status with the OpenAI error body; the admin endpoint absent."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute

from serving.config import load_config
from serving.intake.limits import SERVER_ONLY
from serving.route.core import RouterCore, create_app
from serving.variants.client import FakeVariant

REPO = Path(__file__).resolve().parents[2]
PUBLIC = {
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("GET", "/v1/models"),
    ("POST", "/v1/feedback"),
    ("GET", "/health"),
    ("GET", "/ready"),
}


@pytest.fixture
def core() -> RouterCore:
    config = load_config(REPO / "deploy" / "demo.yaml")
    return RouterCore(config, {name: FakeVariant(name) for name in config.variants})


@pytest.fixture
async def document(core: RouterCore) -> AsyncIterator[dict[str, Any]]:
    transport = httpx.ASGITransport(app=create_app(lambda: core))
    async with httpx.AsyncClient(transport=transport, base_url="http://router") as http:
        answer = await http.get("/openapi.json")
        assert answer.status_code == 200
        yield answer.json()


def resolve(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    name = schema["$ref"].removeprefix("#/components/schemas/")
    found: dict[str, Any] = document["components"]["schemas"][name]
    return found


def body_schema(document: dict[str, Any], path: str) -> dict[str, Any]:
    body = document["paths"][path]["post"]["requestBody"]
    assert body["required"] is True
    return resolve(document, body["content"]["application/json"]["schema"])


def test_the_document_holds_every_public_route_and_no_admin_route(document: dict[str, Any], core: RouterCore) -> None:
    declared = {(method.upper(), path) for path, item in document["paths"].items() for method in item}
    assert declared == PUBLIC
    routes = {
        (method, route.path)
        for route in create_app(lambda: core).routes
        if isinstance(route, APIRoute)
        for method in route.methods
    }
    assert routes - PUBLIC == {("GET", "/admin/rollout")}  # the app serves nothing else


def test_request_bodies_are_vllms_models_narrowed_to_this_servers_limits(
    document: dict[str, Any], core: RouterCore
) -> None:
    limits = core.config.limits
    chat = body_schema(document, "/v1/chat/completions")
    completion = body_schema(document, "/v1/completions")
    assert {"messages", "model"} <= set(chat["required"])
    assert {"prompt", "model"} <= set(completion["required"])
    assert chat["properties"]["messages"]["minItems"] == 1
    for schema in (chat, completion):
        props = schema["properties"]
        assert props["model"]["enum"] == [core.config.model]
        assert not set(SERVER_ONLY) & set(props)  # refused with a 400: not offered
        n = [arm for arm in props["n"].get("anyOf", [props["n"]]) if arm.get("type") == "integer"]
        assert (n[0]["minimum"], n[0]["maximum"]) == (1, limits.max_n)
        (max_tokens,) = [arm for arm in props["max_tokens"]["anyOf"] if arm.get("type") == "integer"]
        assert (max_tokens["minimum"], max_tokens["maximum"]) == (1, limits.max_tokens)
    (batch,) = [
        arm for arm in completion["properties"]["prompt"]["anyOf"] if arm.get("items", {}).get("type") == "string"
    ]
    assert batch["maxItems"] == limits.max_prompts
    feedback = body_schema(document, "/v1/feedback")
    assert set(feedback["required"]) == {"response_id", "overridden"}
    for kind in chat["properties"]["messages"]["items"]["anyOf"]:  # a message without a role is refused
        assert "role" in resolve(document, kind)["required"], kind
    roles = document["components"]["schemas"]["CustomChatCompletionMessageParam"]["properties"]["role"]["enum"]
    assert "wizard" not in roles
    assert "user" in roles


@pytest.mark.parametrize(
    ("method", "path", "statuses"),
    [
        ("post", "/v1/chat/completions", {"400", "401", "403", "404", "413", "429", "431", "500", "503"}),
        ("post", "/v1/completions", {"400", "401", "403", "404", "413", "429", "431", "500", "503"}),
        ("post", "/v1/feedback", {"400", "401", "403", "404", "409", "413", "429", "431", "500"}),
        ("get", "/v1/models", {"401", "431", "500"}),
        ("get", "/health", {"431"}),
    ],
)
def test_every_error_status_is_declared_with_the_openai_error_body(
    document: dict[str, Any], method: str, path: str, statuses: set[str]
) -> None:
    responses = document["paths"][path][method]["responses"]
    assert {s for s in responses if s != "200" and not (path == "/ready" and s == "503")} == statuses
    for status in statuses:
        error = resolve(document, responses[status]["content"]["application/json"]["schema"])
        assert error["required"] == ["error"]
        detail = resolve(document, error["properties"]["error"])
        assert set(detail["required"]) == {"message", "type", "param", "code"}


def test_a_streamed_answer_is_declared_as_server_sent_events(document: dict[str, Any]) -> None:
    answer = document["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert set(answer) == {"application/json", "text/event-stream"}
    assert answer["text/event-stream"]["schema"]["required"] == ["data"]


async def test_the_document_follows_an_applied_config(core: RouterCore) -> None:
    transport = httpx.ASGITransport(app=create_app(lambda: core))
    async with httpx.AsyncClient(transport=transport, base_url="http://router") as http:
        before = (await http.get("/openapi.json")).json()
        was = core.config.limits.max_n
        limits = core.config.limits.model_copy(update={"max_n": was - 1})
        core.apply(core.config.model_copy(update={"limits": limits}))
        after = (await http.get("/openapi.json")).json()
    n_of = [
        resolve(d, d["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"])[
            "properties"
        ]["n"]
        for d in (before, after)
    ]
    assert [n.get("maximum") for n in n_of] == [was, was - 1]


def test_the_headers_a_client_reads_are_declared(document: dict[str, Any]) -> None:
    responses = document["paths"]["/v1/completions"]["post"]["responses"]
    assert responses["200"]["headers"]["x-served-variant"]["required"] is True
    assert responses["429"]["headers"]["retry-after"]["required"] is True
    assert responses["503"]["headers"]["retry-after"]["required"] is False  # only when an engine is full
