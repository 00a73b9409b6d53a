"""A variant's deployment: Ray Serve LLM's `LLMServer` hosting one vLLM engine, warmed before it is ready.

An engine's first generation is slow (kernels are built on first use). A replica of this class
answers a real one-token generation inside its constructor, so Ray Serve marks it healthy, and routes
traffic to it, only once it is warm: at startup, on a restart and on scale-out alike. The warm-up goes
to the engine directly, never through the router, so it counts in no router metric or rollout signal.

Start-up is kept short (README, "Start-up"): the activation dtype and torch.compile are chosen here
from this node's hardware (`serving.hardware`); a local model folder skips Ray's per-node download
task; and a one-process engine runs its model in the engine-core process instead of spawning a
worker process for it (vLLM's "uni" executor, which Ray Serve LLM does not pick on CPU).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from ray.serve.llm import LLMServer

from serving.hardware import Capabilities, Dtype, DtypeChoice, choose_compile, choose_dtype, detect, weights_dtype
from serving.kernels import merge

logger = logging.getLogger("serving.engine")

WARM_PROMPT = "Hello"


class NotWarm(RuntimeError):
    """The engine did not answer its one-token generation."""


def configure(
    llm_config: Any, precision: str, pinned_dtype: Dtype | None, pinned_compile: bool | None
) -> tuple[Capabilities, DtypeChoice, bool]:
    """Sets the engine's dtype and compilation from this node's hardware, before the engine starts."""
    capabilities = detect()
    model_dir = Path(llm_config.model_loading_config.model_source)
    choice = choose_dtype(precision, weights_dtype(model_dir), capabilities, pinned_dtype)
    compiled = choose_compile(capabilities, pinned_compile)
    llm_config.update_engine_kwargs(dtype=choice.dtype, enforce_eager=not compiled)
    if model_dir.is_dir():
        # Already on this node: Ray's download step would only start a task (a new worker process
        # that imports vLLM, half a minute on 2 cores) to find the folder where it is.
        llm_config.get_or_create_callback().ctx.run_init_node = False
    return capabilities, choice, compiled


class VariantServer(LLMServer):  # type: ignore[misc]
    # Ray Serve awaits an async constructor; LLMServer's own is one.
    async def __init__(  # type: ignore[misc]
        self,
        llm_config: Any,
        *,
        variant: str,
        precision: str,
        pinned_dtype: Dtype | None = None,
        pinned_compile: bool | None = None,
    ) -> None:
        started = time.monotonic()
        capabilities, choice, compiled = configure(llm_config, precision, pinned_dtype, pinned_compile)
        await super().__init__(llm_config, engine_cls=engine_class())
        engine_s = time.monotonic() - started
        warm_s = await self.generate_one_token()
        self.facts: dict[str, Any] = {
            "variant": variant,
            "precision": precision,
            "dtype": choice.dtype,
            "dtype_reason": choice.reason,
            "hardware": capabilities.describe(),
            "compiled": compiled,
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


def engine_class() -> type:
    """Ray Serve LLM's vLLM engine, with one-process engines run by vLLM's "uni" executor.

    On CPU Ray Serve LLM always asks vLLM for its multiprocessing executor, which spawns a worker
    process next to the engine-core process even for a single worker: one more process that imports
    torch and vLLM and loads the model. `LLMServer` takes the engine class as an argument for exactly
    this kind of change; the class itself is not exported by `ray.serve.llm`.
    """
    from ray.llm._internal.serve.engines.vllm.vllm_engine import VLLMEngine

    class OneProcessEngine(VLLMEngine):  # type: ignore[misc]
        def _prepare_engine_config(self, callback_ctx: Any) -> Any:
            engine_args, frontend_args, vllm_config = super()._prepare_engine_config(callback_ctx)
            parallel = vllm_config.parallel_config
            if parallel.world_size == 1 and parallel.distributed_executor_backend == "mp":
                parallel.distributed_executor_backend = "uni"
            return engine_args, frontend_args, vllm_config

    return OneProcessEngine
