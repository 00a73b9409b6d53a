"""How the router calls a variant: one small interface, a Ray Serve handle implementation for the
real `LLMServer` deployments, and a deterministic in-process fake for fast router tests.

A call yields what Ray Serve LLM's `LLMServer` yields: for a non-streaming request one response
object (or an `ErrorResponse`); for a streaming request batches of ready SSE strings
(`"data: {...}\\n\\n"`), or an `ErrorResponse` first.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Literal, Protocol

Kind = Literal["chat", "completions"]


class VariantClient(Protocol):
    def call(self, kind: Kind, request: Any) -> AsyncIterator[Any]: ...

    async def healthy(self) -> bool: ...


class RayVariant:
    """Calls one `LLMServer` deployment through its handle."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle.options(stream=True)
        self._unary = handle

    async def call(self, kind: Kind, request: Any) -> AsyncIterator[Any]:
        async for item in getattr(self._handle, kind).remote(request, None):
            yield item

    async def healthy(self) -> bool:
        try:
            await self._unary.check_health.remote()
        except Exception:
            return False
        return True


class FakeVariant:
    """Deterministic, in-process stand-in for an engine, for fast router tests: it answers with the
    vLLM response types, echoing its own name, or fails the way it is told to."""

    def __init__(self, name: str, *, fail: Exception | None = None, error_status: int | None = None) -> None:
        self.name = name
        self.fail = fail
        self.error_status = error_status
        self.requests: list[Any] = []

    async def call(self, kind: Kind, request: Any) -> AsyncIterator[Any]:
        from ray.llm._internal.serve.core.configs.openai_api_models import (
            ChatCompletionResponse,
            CompletionResponse,
            ErrorInfo,
            ErrorResponse,
        )

        self.requests.append(request)
        if self.fail is not None:
            raise self.fail
        if self.error_status is not None:
            info = ErrorInfo(message="rejected by the engine", type="BadRequestError", code=self.error_status)
            yield ErrorResponse(error=info)
            return
        text = f"answer from {self.name}"
        usage = {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}
        if getattr(request, "stream", False):
            for piece in text.split(" "):
                chunk = {
                    "id": "fake",
                    "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                    "model": request.model,
                    "choices": [{"index": 0, "delta": {"content": piece + " "}, "text": piece + " "}],
                }
                yield [f"data: {json.dumps(chunk)}\n\n"]
            return
        if kind == "chat":
            yield ChatCompletionResponse(
                model=request.model,
                choices=[{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                usage=usage,
            )
        else:
            yield CompletionResponse(
                model=request.model, choices=[{"index": 0, "text": text, "finish_reason": "stop"}], usage=usage
            )

    async def healthy(self) -> bool:
        return self.fail is None
