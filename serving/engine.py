"""A variant's deployment: Ray Serve LLM's `LLMServer` hosting one vLLM engine, warmed before it is ready.

An engine's first generation is slow (kernels are built on first use). A replica of this class
answers a real one-token generation inside its constructor, so Ray Serve marks it healthy, and routes
traffic to it, only once it is warm: at startup, on a restart and on scale-out alike. The warm-up goes
to the engine directly, never through the router, so it counts in no router metric or rollout signal.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from ray.serve.llm import LLMServer

from serving.hardware import Dtype, choose_dtype, detect, weights_dtype
from serving.kernels import merge

logger = logging.getLogger("serving.engine")

WARM_PROMPT = "Hello"


class NotWarm(RuntimeError):
    """The engine did not answer its one-token generation."""


class VariantServer(LLMServer):  # type: ignore[misc]
    # Ray Serve awaits an async constructor; LLMServer's own is one.
    async def __init__(  # type: ignore[misc]
        self, llm_config: Any, *, variant: str, precision: str, pinned_dtype: Dtype | None
    ) -> None:
        started = time.monotonic()
        # Chosen here, on the node that runs the engine: its hardware is what decides.
        capabilities = detect()
        model_dir = Path(llm_config.model_loading_config.model_source)
        choice = choose_dtype(precision, weights_dtype(model_dir), capabilities, pinned_dtype)
        llm_config.update_engine_kwargs(dtype=choice.dtype)
        await super().__init__(llm_config)
        engine_s = time.monotonic() - started
        warm_s = await self.generate_one_token()
        self.facts: dict[str, Any] = {
            "variant": variant,
            "precision": precision,
            "dtype": choice.dtype,
            "dtype_reason": choice.reason,
            "hardware": capabilities.describe(),
            "linear_kernels": await self.linear_kernels(),
            "engine_start_s": round(engine_s, 1),
            "warm_up_s": round(warm_s, 1),
        }
        logger.info("variant %s ready: %s", variant, self.facts)

    async def generate_one_token(self) -> float:
        """Runs a real one-token generation through the engine; returns its seconds, raises `NotWarm`."""
        from ray.serve.llm.openai_api_models import CompletionRequest, ErrorResponse

        started = time.monotonic()
        request = CompletionRequest(model=self._llm_config.model_id, prompt=WARM_PROMPT, max_tokens=1, temperature=0.0)
        async for answer in await self.completions(request):
            if isinstance(answer, ErrorResponse):
                raise NotWarm(f"the engine refused its one-token generation: {answer.error.message}")
        return time.monotonic() - started

    async def linear_kernels(self) -> list[str]:
        """The kernels vLLM runs this variant's linear layers with (see serving.kernels)."""
        try:
            return merge(await self.collective_rpc("linear_kernels"))
        except Exception as exc:  # a report, not a reason to refuse traffic
            logger.warning("could not read the engine's linear kernels: %r", exc)
            return []

    async def describe(self) -> dict[str, Any]:
        """What this replica serves: precision, activation dtype and why, kernels, start-up seconds."""
        return self.facts
