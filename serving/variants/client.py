"""How the router calls a variant: one small interface, a Ray Serve handle implementation for the
real `LLMServer` deployments, and a deterministic in-process fake for fast router tests.

A call yields what Ray Serve LLM's `LLMServer` yields: for a non-streaming request one response
object (or an `ErrorResponse`); for a streaming request batches of ready SSE strings
(`"data: {...}\\n\\n"`), or an `ErrorResponse` first.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeAlias

if TYPE_CHECKING:  # the protocol models are imported where they are built: importing them costs seconds
    from ray.serve.llm.openai_api_models import (
        ChatCompletionRequest,
        ChatCompletionResponse,
        CompletionRequest,
        CompletionResponse,
        ErrorResponse,
    )

Endpoint = Literal["chat", "completions"]  # the OpenAI endpoint: /v1/chat/completions or /v1/completions
EngineRequest: TypeAlias = "ChatCompletionRequest | CompletionRequest"
WholeAnswer: TypeAlias = "ChatCompletionResponse | CompletionResponse"
# What a call yields: a whole answer, or batches of SSE strings (one string or a list), or the engine's error.
EngineItem: TypeAlias = "WholeAnswer | ErrorResponse | str | list[str]"

# How long a request waits for Ray Serve to hand it to a replica of its variant: milliseconds normally. With
# no replica running (its node lost, every replica restarting) Serve would queue it until one starts, for
# minutes or for ever, and the client would hang; past this bound it fails as a 503 that clients retry.
ASSIGN_TIMEOUT_S = 10.0
# But a request waiting while a replica works on this router's other calls of the variant (one taken or ended
# within ASSIGN_TIMEOUT_S) is in Serve's bounded queue (max_queued_requests) behind a busy replica, not waiting
# for a missing one: it waits on, up to this long in all, and is then refused as a full engine (a 503 with
# Retry-After, which says nothing of the variant's health). Seen on the real stack: 160 of 420 requests at once
# failed as "unavailable" after 10 s in the queue, each counted as an error of a variant that was working.
QUEUE_WAIT_S = 120.0
# And a router none of whose calls the engine took (another router replica holds every slot) cannot tell busy
# from missing by its own calls: before it calls the variant missing it asks Serve's controller whether the
# deployment has a RUNNING replica, and waits on if so. Seen in CI: 128 of 420 requests failed as "unavailable"
# that way. Many waiters time out together: one answer serves them all for this long.
REPLICA_CHECK_TTL_S = 2.0
REPLICA_CHECK_TIMEOUT_S = 5.0


class NoReplica(RuntimeError):
    """No replica of the variant took the request within ASSIGN_TIMEOUT_S, and none took another of ours."""


class QueueWaitExceeded(RuntimeError):
    """The request waited QUEUE_WAIT_S in the queue of a variant whose replica was busy: a full engine."""


class VariantClient(Protocol):
    def call(self, endpoint: Endpoint, request: EngineRequest) -> AsyncIterator[EngineItem]: ...

    async def healthy(self) -> bool:
        """Whether the variant answers a real one-token generation now."""
        ...

    async def describe(self) -> dict[str, Any]:
        """What the variant's engine runs: activation dtype and why, linear kernels, start-up seconds."""
        ...


class ServeReplicas:
    """How many replicas Serve's controller counts RUNNING for one deployment (serve.status(), a blocking call,
    off the event loop). None when the controller does not answer: the caller cannot tell."""

    def __init__(self, app: str, deployment: str) -> None:
        self.app = app
        self.deployment = deployment
        self._answer: asyncio.Future[int | None] | None = None
        self._asked_at = -float("inf")

    async def running(self) -> int | None:
        if self._answer is None or (self._answer.done() and time.monotonic() - self._asked_at >= REPLICA_CHECK_TTL_S):
            self._asked_at = time.monotonic()
            self._answer = asyncio.ensure_future(self._ask())
        return await asyncio.shield(self._answer)

    async def _ask(self) -> int | None:
        try:
            return await asyncio.wait_for(asyncio.to_thread(self._count), REPLICA_CHECK_TIMEOUT_S)
        except Exception:
            return None

    def _count(self) -> int:
        from ray import serve

        app = serve.status().applications.get(self.app)
        deployment = app.deployments.get(self.deployment) if app else None
        if deployment is None:
            return 0
        return sum(n for state, n in deployment.replica_states.items() if state == "RUNNING")


class RayVariant:
    """Calls one `LLMServer` deployment through its handle."""

    def __init__(self, handle: Any, replicas: ServeReplicas | None = None) -> None:
        self._handle = handle.options(stream=True)
        self._unary = handle
        self.replicas = replicas or ServeReplicas(handle.app_name, handle.deployment_name)
        self.running = 0  # this router's calls that a replica took and is still working on
        self.progressed_at = -float("inf")  # when one of them was last taken or ended (monotonic)

    async def call(self, endpoint: Endpoint, request: EngineRequest) -> AsyncGenerator[EngineItem, None]:
        answer = getattr(self._handle, endpoint).remote(request, None)
        finished = taken = False
        try:
            await self.wait_for_replica(answer)
            taken = True
            self.running += 1
            self.progressed_at = time.monotonic()
            async for item in answer:
                yield item
            finished = True
        finally:
            if taken:
                self.running -= 1
                self.progressed_at = time.monotonic()
            if not finished:  # no replica, closed early (the client went away) or cancelled: the engine stops
                answer.cancel()

    async def wait_for_replica(self, answer: Any) -> None:
        """Serve's own wait for a replica (what iterating the response awaits first), bounded as ASSIGN_TIMEOUT_S
        and QUEUE_WAIT_S say. A private method: Serve has no public way to bound the assignment apart from the
        generation."""
        started = time.monotonic()
        assigned = asyncio.ensure_future(answer._fetch_future_result_async())
        try:
            while not (await asyncio.wait({assigned}, timeout=ASSIGN_TIMEOUT_S))[0]:
                idle = self.running == 0 and time.monotonic() - self.progressed_at >= ASSIGN_TIMEOUT_S
                if idle and not await self.replicas.running():
                    raise NoReplica(f"no replica took the request within {ASSIGN_TIMEOUT_S:.0f} s")
                if time.monotonic() - started >= QUEUE_WAIT_S:
                    raise QueueWaitExceeded(f"the request waited {QUEUE_WAIT_S:.0f} s for a busy replica")
            assigned.result()  # Serve's own failure (a full queue: BackPressureError), if any
        finally:
            assigned.cancel()  # a no-op once it is done

    async def healthy(self) -> bool:
        try:
            await self._unary.generate_one_token.remote()
        except Exception:
            return False
        return True

    async def describe(self) -> dict[str, Any]:
        facts: dict[str, Any] = await self._unary.describe.remote()
        return facts


class FakeVariant:
    """Deterministic, in-process stand-in for an engine, for fast router tests. Words are its tokens: it
    answers "answer from <name>" (or the `answer` it is given), reports usage, and teacher-forces text
    (`prompt_logprobs`) with log-probabilities that depend on its name, so two fakes of different names
    disagree and drift, and a fake compared with itself does neither. Asked for `logprobs`, it gives each
    answer word `answer_logprob` (its confidence, for escalation). It can also fail the way it is told to."""

    def __init__(
        self,
        name: str,
        *,
        fail: Exception | None = None,
        error_status: int | None = None,
        delay_s: float = 0.0,
        fail_midstream: Exception | None = None,
        words_per_chunk: int = 1,
        chunk_delay_s: float = 0.0,
        answer: str | None = None,
        answer_logprob: float = -1.0,
    ) -> None:
        self.name = name
        self.answer_logprob = answer_logprob
        self.answer = answer or f"answer from {name}"
        self.words_per_chunk = words_per_chunk  # an engine may send several tokens in one chunk
        self.chunk_delay_s = chunk_delay_s
        self.fail = fail
        self.fail_midstream = fail_midstream  # raised after the first streamed chunk
        self.error_status = error_status
        self.delay_s = delay_s
        self.requests: list[EngineRequest] = []
        self.health_checks = 0

    @staticmethod
    def words(endpoint: Endpoint, request: EngineRequest) -> list[str]:
        if endpoint == "chat":
            return " ".join(
                str(m.get("content") if isinstance(m, dict) else m.content) for m in request.messages
            ).split()
        return str(request.prompt).split()

    def response_id(self, endpoint: Endpoint, request: EngineRequest) -> str:
        """Named after the request id, as vLLM names its responses."""
        request_id = getattr(request, "request_id", None) or f"{self.name}-{len(self.requests)}"
        return f"{'chatcmpl' if endpoint == 'chat' else 'cmpl'}-{request_id}"

    @staticmethod
    def token(word: str) -> int:
        return sum(word.encode()) % 1000

    async def call(self, endpoint: Endpoint, request: EngineRequest) -> AsyncIterator[EngineItem]:
        from ray.serve.llm.openai_api_models import ChatCompletionResponse, CompletionResponse, ErrorResponse

        self.requests.append(request)
        if self.delay_s:
            import asyncio

            await asyncio.sleep(self.delay_s)
        if self.fail is not None:
            raise self.fail
        if self.error_status is not None:
            info = {"message": "rejected by the engine", "type": "BadRequestError", "code": self.error_status}
            yield ErrorResponse(error=info)
            return
        text = self.answer
        prompt, answer_words = self.words(endpoint, request), len(text.split())
        usage = {
            "prompt_tokens": len(prompt),
            "completion_tokens": answer_words,
            "total_tokens": len(prompt) + answer_words,
        }
        if request.stream:
            import asyncio

            from ray.serve.llm.openai_api_models import ChatCompletionStreamResponse, CompletionStreamResponse

            chunk_model = ChatCompletionStreamResponse if endpoint == "chat" else CompletionStreamResponse
            header = {"id": self.response_id(endpoint, request), "model": request.model}
            words = text.split(" ")
            for start in range(0, len(words), self.words_per_chunk):
                if start and self.chunk_delay_s:
                    await asyncio.sleep(self.chunk_delay_s)
                piece = " ".join(words[start : start + self.words_per_chunk]) + " "
                part = {"index": 0, "delta": {"content": piece}} if endpoint == "chat" else {"index": 0, "text": piece}
                chunk = chunk_model(**header, choices=[part])
                yield [f"data: {chunk.model_dump_json(exclude_unset=True)}\n\n"]
                if self.fail_midstream is not None:
                    raise self.fail_midstream
            options = request.stream_options
            if options is not None and options.include_usage:  # as vLLM: a last chunk, no choices
                closing = chunk_model(**header, choices=[], usage=usage)
                yield [f"data: {closing.model_dump_json(exclude_unset=True)}\n\n"]
            return
        extra: dict[str, Any] = {"id": self.response_id(endpoint, request), "model": request.model, "usage": usage}
        if getattr(request, "prompt_logprobs", None) is not None:
            ids = [self.token(w) for w in prompt]
            extra["prompt_token_ids"] = ids
            extra["prompt_logprobs"] = [None] + [
                {i: {"logprob": -((i + sum(self.name.encode())) % 13) / 4}} for i in ids[1:]
            ]
        words, logprob = text.split(), self.answer_logprob
        if endpoint == "chat":
            message = {"role": "assistant", "content": text}
            choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": "stop"}
            if request.logprobs:
                choice["logprobs"] = {"content": [{"token": w, "logprob": logprob} for w in words]}
            yield ChatCompletionResponse(choices=[choice], **extra)
        else:  # completions carry the prompt's tokens and log-probs on the choice, as vLLM's do
            scored: dict[str, Any] = {k: extra.pop(k) for k in ("prompt_token_ids", "prompt_logprobs") if k in extra}
            choice = {"index": 0, "text": text, "finish_reason": "stop", **scored}
            if request.logprobs is not None:
                choice["logprobs"] = {"tokens": words, "token_logprobs": [logprob] * len(words)}
            yield CompletionResponse(choices=[choice], **extra)

    async def healthy(self) -> bool:
        self.health_checks += 1
        if self.delay_s:
            import asyncio

            await asyncio.sleep(self.delay_s)
        return self.fail is None

    async def describe(self) -> dict[str, Any]:
        return {"variant": self.name, "dtype": "float16", "dtype_reason": "a fake", "linear_kernels": ["FakeLinear"]}
