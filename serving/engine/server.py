"""A variant's deployment: Ray Serve LLM's `LLMServer` hosting one vLLM engine, proven on this machine before
it is ready.

An engine's first generations are slow (kernels are built on first use), and whether a variant's kernels
run right depends on this machine (STACK.md, quirk 10). So a replica of this class, inside its constructor,
answers the fixed facts of `serving.engine.verify` and judges them against the reference variant's answers on the
same machine, trying the viable activation dtypes in `serving.engine.hardware.dtype_order`'s order and keeping the
first that passes. Ray Serve marks it healthy, and routes traffic to it, only once it is warm and proven:
at startup, on a restart and on scale-out alike. These calls go to the engine directly, never through the
router, so they count in no router metric or rollout signal.

A variant that no dtype makes fit is unfit on this machine, with the reason in the machine-local record:
- a `required` one (a tier's baseline, or the reference) raises, and Serve reports the deployment failed,
  which stops start-up with the engine's own name and reason (serving.ops.launch);
- any other (a candidate, a shadow-only target) stays up with no engine, refuses every call, and tells the
  rollout controller (`VariantUnfit`), which takes it out of the rollout: the stack serves every tier from
  its baseline, and Serve, seeing a healthy replica, never restarts an engine that cannot run here.

Start-up is kept short (README, "Start-up"): torch.compile is chosen from this node's hardware, a local
model folder skips Ray's per-node download task, and a one-worker CPU engine runs its model in the
engine-core process instead of a worker process of its own (`engine_class`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.serve.llm import LLMServer

from serving.engine import verify
from serving.engine.hardware import Capabilities, Dtype, DtypeChoice, choose_compile, cpu_threads_bind, detect
from serving.engine.kernels import merge
from serving.rollout.controller import announce_started, announce_unfit
from serving.rollout.signals import ReplicaStarted, VariantUnfit

logger = logging.getLogger("serving.engine.server")

WARM_PROMPT = "Hello"
# How long a variant waits for its reference's answers: the reference's engine starts beside it.
REFERENCE_WAIT_S = 900.0
# An unfit variant tells the controller again this often, so a controller that restarted learns it too.
UNFIT_REPEAT_S = 30.0


class NotWarm(RuntimeError):
    """The engine did not answer its one-token generation."""


class Unfit(RuntimeError):
    """The variant is unfit on this machine; the message says why."""


@dataclass(frozen=True)
class Placement:
    """Where this engine runs: on the node's GPUs, or as one of the CPU engines that share its node."""

    index: int = 0
    engines: int = 1
    gpu: bool = False


@dataclass(frozen=True)
class Verification:
    """What this replica is proven against: the reference's name and handle (None: it is the reference), whether
    its failing stops the stack (`required`), and the agreement floor."""

    reference: str | None = None
    required: bool = True
    min_agreement: float = verify.MIN_AGREEMENT


def configure(llm_config: Any, pinned_compile: bool | None, placement: Placement) -> tuple[Capabilities, bool]:
    """Sets the engine's compilation and CPU threads from this node's hardware, before it starts."""
    capabilities = detect(gpu=placement.gpu)
    if capabilities.accelerator == "cpu" and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        # Read by vLLM when it starts the engine-core process (see engine_class); an operator's own wins.
        cpus = sorted(os.sched_getaffinity(0))
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_threads_bind(placement.index, placement.engines, cpus)
    compiled = choose_compile(capabilities, pinned_compile)
    llm_config.update_engine_kwargs(enforce_eager=not compiled)
    if Path(llm_config.model_loading_config.model_source).is_dir():
        # Already on this node: Ray's download step would only start a task (a new worker process
        # that imports vLLM, half a minute on 2 cores) to find the folder where it is.
        llm_config.get_or_create_callback().ctx.run_init_node = False
    return capabilities, compiled


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
        verification: Verification | None = None,
        reference: Any = None,  # the reference's deployment handle (Serve passes a bound deployment as one)
    ) -> None:
        started = time.monotonic()
        self.variant = variant
        self.unfit: str | None = None
        self.announcing: asyncio.Task[Any] | None = None  # kept from the GC
        plan = verification or Verification()
        capabilities, compiled = configure(llm_config, pinned_compile, placement or Placement())
        model_dir = Path(llm_config.model_loading_config.model_source)
        found = verify.machine()  # the record's key, read once: the record is read and written under it
        choices = verify.dtype_choices(model_dir, capabilities, pinned_dtype, found)
        self.verdict, choice = await self.prove(llm_config, choices, plan, reference)
        self.record = self.keep_record(model_dir, found)
        self.facts: dict[str, Any] = {
            "variant": variant,
            "precision": precision,
            "dtype": choice.dtype if choice else None,
            "dtype_reason": choice.reason if choice else None,
            "hardware": capabilities.describe(),
            "compiled": compiled,
            "cpu_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
            if capabilities.accelerator == "cpu"
            else None,
            "linear_kernels": await self.linear_kernels() if self.engine is not None else [],
            "engine_start_s": round(time.monotonic() - started, 1),
            "verification": {
                "fit": self.verdict.fit,
                "reason": self.verdict.reason,
                "attempts": [dataclasses.asdict(a) for a in self.verdict.attempts],
                "record": str(self.record) if self.record else None,
            },
            "unfit": None,
        }
        if not self.verdict.fit:
            reason = f"unfit on this machine: {self.verdict.reason}"
            if plan.required:
                raise Unfit(f"{variant} is {reason}")
            self.unfit = reason
            self.facts["unfit"] = reason
            logger.error("variant %s is out of the rollout: %s", variant, reason)
            self.announcing = asyncio.get_running_loop().create_task(self.announce_unfit())
            return
        logger.info("variant %s ready: %s", variant, self.facts)
        # Beside the start, never in its way.
        self.announcing = asyncio.get_running_loop().create_task(self.announce_started())

    async def prove(
        self, llm_config: Any, choices: list[DtypeChoice], plan: Verification, reference: Any
    ) -> tuple[verify.Verdict, DtypeChoice | None]:
        """Starts the engine in each dtype in turn until its answers pass; stops it after each that does not."""
        attempts: list[verify.Attempt] = []
        last: verify.Verdict | None = None
        theirs: tuple[verify.Answer, ...] | None = None
        for choice in choices:
            llm_config.update_engine_kwargs(dtype=choice.dtype)
            try:
                await self.start_engine(llm_config)
                mine = await self.answer_facts()
            except Exception as exc:  # the engine could not start or answer in this dtype
                logger.warning("variant %s failed in %s: %r", self.variant, choice.dtype, exc)
                attempts.append(verify.crashed(choice.dtype, exc))
                await self.stop_engine()
                continue
            if plan.reference is not None and theirs is None:
                try:
                    theirs = await self.reference_answers(reference)
                except Exception as exc:
                    attempts.append(verify.Attempt(choice.dtype, f"could not be compared: {exc}"))
                    await self.stop_engine()
                    return verify.unfit(self.variant, attempts), None
            verdict = verify.judge(self.variant, choice.dtype, mine, plan.reference, theirs or (), plan.min_agreement)
            if verdict.fit:
                attempts.append(verify.Attempt(choice.dtype, "passed"))
                return dataclasses.replace(verdict, attempts=tuple(attempts)), choice
            attempts.append(verify.Attempt(choice.dtype, verdict.reason))
            last = verdict
            await self.stop_engine()
        return verify.unfit(self.variant, attempts, last), None

    async def start_engine(self, llm_config: Any) -> None:
        """LLMServer's own start: its constructor the first time, a new engine (`start`) after a failed try."""
        if not hasattr(self, "_llm_config"):  # set by LLMServer's constructor, before it starts the engine
            await super().__init__(llm_config, engine_cls=engine_class(self._get_default_engine_class()))
        else:
            await self.start()

    async def answer_facts(self) -> tuple[verify.Answer, ...]:
        """The greedy chat answers to the verification facts, all at once (the first also warms the engine)."""
        from ray.serve.llm.openai_api_models import ChatCompletionRequest, ErrorResponse

        async def answer(item: Any) -> verify.Answer:
            request = ChatCompletionRequest(
                model=self._llm_config.model_id,
                messages=[{"role": "user", "content": item.prompt}],
                max_tokens=verify.MAX_TOKENS,
                temperature=0.0,
            )
            async for reply in await self.chat(request):
                if isinstance(reply, ErrorResponse):
                    raise NotWarm(f"the engine refused a verification question: {reply.error.message}")
                return verify.Answer(item.id, item.prompt, reply.choices[0].message.content or "")
            raise NotWarm("the engine returned nothing")

        return tuple(await asyncio.gather(*(answer(item) for item in verify.facts())))

    async def reference_answers(self, reference: Any) -> tuple[verify.Answer, ...]:
        try:
            found = await asyncio.wait_for(reference.verification_answers.remote(), REFERENCE_WAIT_S)
        except TimeoutError:
            raise RuntimeError(f"the reference gave no answers within {REFERENCE_WAIT_S:.0f} s") from None
        if not found:
            raise RuntimeError("the reference has no answers (it is unfit itself)")
        return verify.answers_from(found)

    async def verification_answers(self) -> list[dict[str, Any]]:
        """This replica's answers to the facts, for the variants judged against it."""
        return [dataclasses.asdict(a) for a in self.verdict.answers] if self.verdict.fit else []

    def keep_record(self, model_dir: Path, found: dict[str, Any]) -> Path | None:
        """Writes the verdict to the machine-local record (a report: a read-only disk costs no traffic)."""
        if not model_dir.is_dir():
            return None
        try:
            return verify.write_entry(model_dir, self.verdict, found)
        except OSError as exc:
            logger.warning("could not write the verification record of %s: %r", self.variant, exc)
            return None

    async def stop_engine(self) -> None:
        """Stops this replica's engine, if one started, so its process and memory are gone (best effort)."""
        engine, self.engine = getattr(self, "engine", None), None
        client = getattr(engine, "_engine_client", None)
        try:
            if client is not None and hasattr(client, "shutdown"):
                client.shutdown()
            if engine is not None:
                await engine.shutdown()
        except Exception as exc:
            logger.warning("stopping the engine of %s: %r", self.variant, exc)

    async def announce_started(self) -> None:
        """The rollout controller leaves this variant's latency samples of the next seconds out of its checks
        (serving.rollout.signals.ReplicaStarted)."""
        await announce_started(ReplicaStarted(self.variant, replica_name(), time.time()))

    async def announce_unfit(self) -> None:
        signal = VariantUnfit(self.variant, replica_name(), self.unfit or "unfit", time.time())
        while True:
            await announce_unfit(signal)
            await asyncio.sleep(UNFIT_REPEAT_S)

    async def _run_request(self, request: Any, **kwargs: Any) -> Any:
        if self.unfit is not None:
            raise Unfit(f"variant {self.variant} is {self.unfit}")
        return await super()._run_request(request, **kwargs)

    async def generate_one_token(self) -> float:
        """Runs a real one-token generation through the engine; returns its seconds, raises `NotWarm`."""
        from ray.serve.llm.openai_api_models import CompletionRequest, ErrorResponse

        if self.unfit is not None:
            raise Unfit(f"variant {self.variant} is {self.unfit}")
        started = time.monotonic()
        request = CompletionRequest(model=self._llm_config.model_id, prompt=WARM_PROMPT, max_tokens=1, temperature=0.0)
        async for answer in await self.completions(request):
            if isinstance(answer, ErrorResponse):
                raise NotWarm(f"the engine refused its one-token generation: {answer.error.message}")
        return time.monotonic() - started

    async def linear_kernels(self) -> list[str]:
        """The kernels vLLM runs this variant's linear layers with (see serving.engine.kernels)."""
        try:
            return merge(await self.collective_rpc("linear_kernels"))
        except Exception as exc:  # a report, not a reason to refuse traffic
            logger.warning("could not read the engine's linear kernels: %r", exc)
            return []

    async def describe(self) -> dict[str, Any]:
        """What this replica serves: precision, activation dtype and why, kernels, start-up seconds, verdict."""
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
