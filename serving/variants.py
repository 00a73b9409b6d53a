"""How the router calls a variant: one small interface, a Ray Serve handle implementation for the
real `LLMServer` deployments, and a deterministic in-process fake for fast router tests.

A call yields what Ray Serve LLM's `LLMServer` yields: for a non-streaming request one response
object (or an `ErrorResponse`); for a streaming request batches of ready SSE strings
(`"data: {...}\\n\\n"`), or an `ErrorResponse` first.
"""

from __future__ import annotations

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
