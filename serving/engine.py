"""A variant's deployment: Ray Serve LLM's `LLMServer` hosting one vLLM engine, warmed before it is ready.

An engine's first generation is slow (kernels are built on first use). A replica of this class
answers a real one-token generation inside its constructor, so Ray Serve marks it healthy, and routes
traffic to it, only once it is warm: at startup, on a restart and on scale-out alike. The warm-up goes
to the engine directly, never through the router, so it counts in no router metric or rollout signal.

Start-up is kept short (README, "Start-up"): the activation dtype and torch.compile are chosen here
from this node's hardware (`serving.hardware`); a local model folder skips Ray's per-node download
task; and a one-worker CPU engine runs its model in the engine-core process instead of a worker
process of its own (`engine_class`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.serve.llm import LLMServer

from serving.hardware import (
    Capabilities,
    Dtype,
    DtypeChoice,
    choose_compile,
    choose_dtype,
    cpu_threads_bind,
    detect,
    weights_dtype,
)
from serving.kernels import merge
from serving.rollout.controller import announce_started
from serving.rollout.signals import ReplicaStarted

logger = logging.getLogger("serving.engine")

WARM_PROMPT = "Hello"


class NotWarm(RuntimeError):
    """The engine did not answer its one-token generation."""


@dataclass(frozen=True)
class Placement:
    """Where this engine runs: on the node's GPUs, or as one of the CPU engines that share its node."""

    index: int = 0
    engines: int = 1
    gpu: bool = False


def configure(
    llm_config: Any, precision: str, pinned_dtype: Dtype | None, pinned_compile: bool | None, placement: Placement
) -> tuple[Capabilities, DtypeChoice, bool]:
    """Sets the engine's dtype, compilation and CPU threads from this node's hardware, before it starts."""
    capabilities = detect(gpu=placement.gpu)
    if capabilities.accelerator == "cpu" and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        # Read by vLLM when it starts the engine-core process (see engine_class); an operator's own wins.
        cpus = sorted(os.sched_getaffinity(0))
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_threads_bind(placement.index, placement.engines, cpus)
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
        placement: Placement | None = None,
    ) -> None:
        started = time.monotonic()
        capabilities, choice, compiled = configure(
            llm_config, precision, pinned_dtype, pinned_compile, placement or Placement()
        )
        await super().__init__(llm_config, engine_cls=engine_class(self._get_default_engine_class()))
        engine_s = time.monotonic() - started
        warm_s = await self.generate_one_token()
        self.facts: dict[str, Any] = {
            "variant": variant,
            "precision": precision,
            "dtype": choice.dtype,
            "dtype_reason": choice.reason,
            "hardware": capabilities.describe(),
            "compiled": compiled,
            "cpu_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
            if capabilities.accelerator == "cpu"
            else None,
            "linear_kernels": await self.linear_kernels(),
            "engine_start_s": round(engine_s, 1),
            "warm_up_s": round(warm_s, 1),
        }
        logger.info("variant %s ready: %s", variant, self.facts)
        # The rollout controller leaves this variant's latency samples of the next seconds out of its checks
        # (serving.rollout.signals.ReplicaStarted). Beside the start, never in its way; kept from the GC.
        started_signal = ReplicaStarted(variant, replica_name(), time.time())
        self.announcing = asyncio.get_running_loop().create_task(announce_started(started_signal))

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


def replica_name() -> str:
    """Serve's id of this replica, for the rollout status a person reads."""
    try:
        from ray import serve

        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # outside a Serve replica
        return f"pid-{os.getpid()}"


def engine_class(default: type) -> type | None:
    """Ray Serve LLM's vLLM engine, except that a CPU engine with one worker runs that worker in its
    engine-core process (vLLM's "uni" executor) instead of spawning one more process for it.

    Ray Serve LLM always asks for vLLM's multiprocessing executor on CPU, which spawns a worker process
    even for one worker: one more process that imports torch and vLLM, about 30 s of start-up for three
    engines on 2 cores. That executor exists on CPU to start the worker with its OpenMP settings (thread
    count, core binding) in the environment; here the engine-core process is started with exactly those
    settings, computed by vLLM's own `OMPProcessManager` (from `VLLM_CPU_OMP_THREADS_BIND`, which
    `configure` sets), so the model runs as bound as a worker process would.
    `LLMServer` takes the engine class as an argument for changes like this one. Ray exports no public name
    for its vLLM engine class, so `default` is what `LLMServer` itself would load (its
    `_get_default_engine_class`, which also honours Ray's RAYLLM_VLLM_ENGINE_CLS override); an engine class
    without the method changed here, or a vLLM without the OpenMP manager, keeps that default.
    """
    try:
        from vllm.utils.ompmultiprocessing import OMPProcessManager
    except ImportError:
        logger.warning("Ray Serve LLM's default engine: this vLLM lacks what a one-process engine needs")
        return None  # LLMServer then takes its default
    if not hasattr(default, "_start_async_llm_engine"):
        return None

    class OneProcessEngine(default):  # type: ignore[misc]
        def _start_async_llm_engine(self, engine_args: Any, vllm_config: Any, placement_group: Any) -> Any:
            parallel = vllm_config.parallel_config
            one_cpu_worker = (
                vllm_config.device_config.device_type == "cpu"
                and parallel.world_size == 1
                and parallel.distributed_executor_backend == "mp"
            )
            if not one_cpu_worker:
                return super()._start_async_llm_engine(engine_args, vllm_config, placement_group)
            parallel.distributed_executor_backend = "uni"
            # The engine-core process is spawned inside this call and inherits the environment.
            with OMPProcessManager(vllm_config).configure_omp_envs(rank=0, local_rank=0):
                return super()._start_async_llm_engine(engine_args, vllm_config, placement_group)

    return OneProcessEngine
