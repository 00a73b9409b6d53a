"""The one-process CPU engine is built on the engine class LLMServer itself would load (Ray exports no name
for it), and only where that class has the step it changes."""

from __future__ import annotations

from typing import Any

from serving.engine.server import engine_class


class Starts:
    def _start_async_llm_engine(self, engine_args: Any, vllm_config: Any, placement_group: Any) -> str:
        return f"started with {vllm_config.parallel_config.distributed_executor_backend}"


class Config:
    def __init__(self, device: str, world_size: int) -> None:
        self.device_config = type("Device", (), {"device_type": device})()
        self.parallel_config = type("Parallel", (), {"world_size": world_size, "distributed_executor_backend": "mp"})()


def test_the_engine_subclasses_the_default_and_keeps_other_setups_as_they_are() -> None:
    built = engine_class(Starts)
    assert built is not None
    assert issubclass(built, Starts)
    # Two workers (or a GPU) keep the multiprocessing executor: only one CPU worker moves in-process.
    assert built()._start_async_llm_engine(None, Config("cpu", 2), None) == "started with mp"
    assert built()._start_async_llm_engine(None, Config("cuda", 1), None) == "started with mp"


def test_an_engine_class_without_that_step_is_left_to_llm_server() -> None:
    assert engine_class(object) is None
